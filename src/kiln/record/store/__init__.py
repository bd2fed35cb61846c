"""Metadata stores: small interfaces per aggregate (:mod:`kiln.record.store.base`); one
SQL implementation, SQLite or PostgreSQL. :func:`open_store` is how anything outside
this package gets one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.record.store.base import RunQuery, Store, WriteBatch

if TYPE_CHECKING:
    from kiln.config import Settings
    from kiln.record.blobs import FileBlobStore
    from kiln.record.store.sql import SqlStore

__all__ = ["RunQuery", "Store", "WriteBatch", "open_store"]


def open_store(
    target: Settings | str, *, blobs: FileBlobStore | None = None, create: bool = True
) -> SqlStore:
    """The store ``target`` names: the settings' ``KILN_STORE`` (with their actor), or a
    store URL. ``create`` makes the schema if it is missing (else a missing store is an
    error). SQLAlchemy loads here, on first use."""
    from kiln.record.store.sql import SqlStore

    if isinstance(target, str):
        return SqlStore(target, blobs, create=create)
    return SqlStore(target.store_url, blobs, create=create, actor=target.actor,
                    home_origin=target.home_origin)  # fmt: skip
