"""Pickling for ``kiln.save``: the same object gives the same bytes in any process.

Artifacts are content-addressed, and ``kiln reproduce`` compares them by sha256, so
saving an equal object again must give equal bytes. Plain ``pickle`` does not for
torch tensors: a tensor's storage pickles through torch's legacy format, which
names each storage by its memory address (``str(storage._cdata)``), so
``kiln.save("model", model.state_dict())`` got a new hash in every process.

Storages are written with ``torch.save``'s zip format instead, which numbers them
in order (and is deterministic). The bytes still unpickle with plain ``pickle``
(``torch.storage._load_from_bytes`` reads both formats), without Kiln.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, torch: Any) -> None:
        super().__init__(file, protocol=5)
        self._storages = (torch.UntypedStorage, torch.storage.TypedStorage)
        self._torch = torch

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, self._storages):
            data = io.BytesIO()
            self._torch.save(obj, data)  # zip format: storages named 0, 1, ... not by address
            return self._torch.storage._load_from_bytes, (data.getvalue(),)
        return NotImplemented


def dumps(obj: object) -> bytes:
    """``pickle.dumps(obj, protocol=5)``, with torch storages pickled deterministically."""
    torch = sys.modules.get("torch")  # only objects of an imported torch can hold tensors
    if torch is None:
        return pickle.dumps(obj, protocol=5)
    buffer = io.BytesIO()
    _Pickler(buffer, torch).dump(obj)
    return buffer.getvalue()
