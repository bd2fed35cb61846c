"""kiln.save's pickles: equal objects give equal bytes in any process, torch tensors too."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys

import torch

from kiln.record._pickling import dumps

STATE = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
"""


def test_a_state_dict_pickles_to_the_same_bytes_in_another_process() -> None:
    namespace: dict[str, object] = {}
    exec(STATE, namespace)  # noqa: S102  the same model here and in the child
    state = namespace["model"].state_dict()  # type: ignore[attr-defined]
    here = hashlib.sha256(dumps(state)).hexdigest()
    code = STATE + (
        "import hashlib\nfrom kiln.record._pickling import dumps\n"
        "print(hashlib.sha256(dumps(model.state_dict())).hexdigest())"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert here == there
    back = pickle.loads(dumps(state))  # plain pickle reads it back, without kiln
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_views_and_objects_without_tensors_round_trip() -> None:
    base = torch.arange(6.0).reshape(2, 3)
    back = pickle.loads(dumps({"base": base, "row": base[1], "n": [1, "x"]}))
    assert torch.equal(back["row"], torch.tensor([3.0, 4.0, 5.0])) and back["n"] == [1, "x"]
