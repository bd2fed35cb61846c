"""A PyTorch sweep on the local engine against the same training loops run plainly.

An MLP on scikit-learn's digits (1,797 8x8 images; a synthetic set of the same shape
made with torch if scikit-learn is not installed), a 12-run grid of learning rate and
width, each run ``cpu=1``: two at a time on two cores, each a recorded run with its
per-epoch loss. The baseline is the same 12 loops one after the other in this process
with ``torch.set_num_threads(1)``, which is what ``cpu=1`` should give each run.
Goal: the sweep within 1.2x of the baseline's time, worker start and imports included.
Without thread bounds each ``cpu=1`` run used every core and the two fought over them
(11x slower on this machine before Kiln set ``OMP_NUM_THREADS`` and the like).

The process is pinned to two cores on bigger machines, so the figure means the same
everywhere.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

import kiln

from _common import Row, emit

EPOCHS = 10
GRID = {"lr": [0.001, 0.003, 0.01], "hidden": [32, 64, 128, 256]}
app = kiln.App("bench-torch")
_data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs scaled to [0, 1] and labels; loaded once per process."""
    if not _data:  # (a dict, not functools.cache: it travels with the function)
        _data["digits"] = _load_digits()
    return _data["digits"]


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # the same shape and classes, without scikit-learn
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (1797,), generator=generator)
        centers = torch.rand(10, 64, generator=generator)
        noise = 0.3 * torch.randn(1797, 64, generator=generator)
        return (centers[labels] + noise).clamp(0, 1), labels
    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def fit(lr: float, hidden: int, log: Any = None) -> dict[str, float]:
    """Train an MLP with Adam on minibatches; the held-out accuracy and last loss."""
    torch.manual_seed(0)
    x, y = digits()
    (x_train, x_test), (y_train, y_test) = x.split([1400, 397]), y.split([1400, 397])
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for epoch in range(EPOCHS):
        for batch in torch.randperm(len(x_train)).split(32):
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if log is not None:
            log({"loss": loss.item()}, step=epoch)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"accuracy": accuracy, "loss": loss.item()}


@app.function(cpu=1)
def train(lr: float, hidden: int) -> dict[str, float]:
    return fit(lr, hidden, log=kiln.log)


def plainly() -> tuple[float, list[dict[str, float]]]:
    torch.set_num_threads(1)
    t = time.perf_counter()
    results = [fit(lr, hidden) for lr in GRID["lr"] for hidden in GRID["hidden"]]
    return time.perf_counter() - t, results


def on_kiln() -> tuple[float, list[dict[str, float]], kiln.RunRecord]:
    t = time.perf_counter()
    sweep = train.sweep(kiln.grid(**GRID))
    results = sweep.results()
    elapsed = time.perf_counter() - t
    return elapsed, results, sweep.best("accuracy")


def main() -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # workers inherit it
    with tempfile.TemporaryDirectory() as home:
        os.environ["KILN_HOME"] = home
        baseline, expected = plainly()
        elapsed, results, best = on_kiln()
    # Same seeds, one thread each: the sweep trains exactly the same models.
    assert [r["accuracy"] for r in results] == [r["accuracy"] for r in expected], results
    assert best.environment.threads["OMP_NUM_THREADS"] == "1"
    emit(
        [
            Row(
                "torch sweep",
                f"12 MLP runs on digits, cpu=1, 2 at a time ({EPOCHS} epochs) (s)",
                elapsed,
                baseline,
                "the 12 loops in one process, torch.set_num_threads(1)",
                "s",
                "<= 1.2x",
                elapsed <= 1.2 * baseline,
            )
        ]
    )


if __name__ == "__main__":
    main()
