"""Metadata stores: small interfaces per aggregate (:mod:`kiln.record.store.base`), a SQL
implementation (SQLite or PostgreSQL) and an HTTP client of ``kiln server``.
:func:`open_store` is how anything outside this package gets one."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, overload

from kiln.record.store.base import KilnStore, RunQuery, Store, WriteBatch

_log = logging.getLogger("kiln")

if TYPE_CHECKING:
    from kiln.config import Settings
    from kiln.record.blobs import FileBlobStore
    from kiln.record.store.sql import SqlStore

__all__ = ["KilnStore", "RunQuery", "Store", "WriteBatch", "open_sql_store", "open_store"]


def is_server_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@overload
def open_store(target: Settings, *, create: bool = True) -> KilnStore: ...
@overload
def open_store(target: str, *, create: bool = True) -> KilnStore: ...
def open_store(target: Settings | str, *, create: bool = True) -> KilnStore:
    """The record ``target`` names: the settings' team server (``KILN_SERVER``) or store
    (``KILN_STORE``, with its blobs under ``KILN_HOME``), or a store or server URL (a
    span writer's, without blobs). ``create`` makes a SQL schema if it is missing (else
    a missing store is an error). SQLAlchemy or httpx loads here, on first use."""
    from kiln.config import server_token
    from kiln.record.store.http import HttpStore

    if isinstance(target, str):
        if is_server_url(target):
            from kiln.config import Settings

            settings = Settings.from_env()
            return HttpStore(target, cache=settings.cache / "server-blobs", actor=settings.actor,
                             token=server_token(target))  # fmt: skip
        return open_sql_store(target, create=create)
    if target.server_url:
        token = target.token or server_token(target.server_url)
        if token and os.environ.get("KILN_ACTOR") and not target.token:
            _log.warning("kiln: KILN_ACTOR is ignored by %s: it records the token's principal",
                         target.server_url)  # fmt: skip
        return HttpStore(
            target.server_url, cache=target.cache / "server-blobs", actor=target.actor,
            token=token, spool_dir=target.home / "spool", project=target.project,
        )  # fmt: skip
    from kiln.record.blobs import FileBlobStore

    return open_sql_store(target.store_url, blobs=FileBlobStore(target.blob_dir), create=create,
                          actor=target.actor, home_origin=target.home_origin,
                          project=target.project)  # fmt: skip


def open_sql_store(
    url: str, *, blobs: FileBlobStore | None = None, create: bool = True,
    actor: str = "unknown", home_origin: str | None = None, project: str | None = None,
) -> SqlStore:  # fmt: skip
    """The SQL store at ``url`` itself: for the side that owns the database (``kiln
    server``, the registry's transactions, ``kiln gc``), seeing ``project``'s runs
    (None: :data:`~kiln.config.DEFAULT_PROJECT`)."""
    from kiln.config import DEFAULT_PROJECT
    from kiln.record.store.sql import SqlStore

    return SqlStore(url, blobs, create=create, actor=actor, home_origin=home_origin,
                    project=project or DEFAULT_PROJECT)  # fmt: skip
