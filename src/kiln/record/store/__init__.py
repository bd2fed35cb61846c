"""Metadata stores: one interface (:class:`Store`), one SQL implementation for SQLite and PostgreSQL."""

from kiln.record.store.base import RunQuery, Store, WriteBatch

__all__ = ["RunQuery", "Store", "WriteBatch"]
