"""``kiln server``: every interface of the record served over HTTP under ``/api/v1``.

:func:`kiln.server.app.build_app` makes the ASGI application over one SQL store;
:func:`kiln.server.main.serve` runs it on uvicorn. Clients are
:class:`kiln.record.store.http.HttpStore` (the SDK with ``KILN_SERVER`` set) and, next,
the dashboard and agents.
"""
