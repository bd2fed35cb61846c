"""Metadata stores: one interface (:class:`Store`); one SQL implementation, SQLite or PostgreSQL."""

from kiln.record.store.base import RunQuery, Store, WriteBatch

__all__ = ["RunQuery", "Store", "WriteBatch"]
