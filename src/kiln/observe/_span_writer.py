"""Stores the spans of one serving replica: ``python -m kiln.observe._span_writer``.

The replica writes the store's URL as the first frame on this process's stdin (never
in argv, where every local user could read its password in /proc), then batches of
compact spans (length-prefixed pickles); here they become rows of the store's
``spans`` table. The JSON and SQL work so runs beside the replica, on another
core when there is one, instead of in the replica's interpreter, where it would hold
the GIL that ``predict`` needs (at a few thousand requests a second it made the tail latency
ten times worse). It exits when the replica closes the pipe, after storing what
it was sent.
"""

from __future__ import annotations

import logging
import pickle
import struct
import sys

_HEADER = struct.Struct("!Q")
_log = logging.getLogger("kiln")


def main() -> None:
    from kiln.observe.tracing import compact_row
    from kiln.record.store import open_store

    pipe = sys.stdin.buffer
    header = pipe.read(_HEADER.size)
    if not header:
        return
    store = open_store(pipe.read(_HEADER.unpack(header)[0]).decode(), create=False)
    try:
        while header := pipe.read(_HEADER.size):
            body = pipe.read(_HEADER.unpack(header)[0])
            spans = pickle.loads(body)  # noqa: S301  our own replica's pipe
            try:
                store.write_spans([compact_row(s) for s in spans])
            except Exception as exc:  # a bad moment for the store: drop, keep serving
                _log.warning("kiln: %d spans were not stored: %s", len(spans), exc)
    finally:
        store.close()


if __name__ == "__main__":
    main()
