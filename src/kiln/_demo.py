"""The demo's experiment: an SGD classifier on scikit-learn's digits, one run per call.

It has its own module, free of the CLI's imports, because it runs inside the
environment it declares, which holds scikit-learn and nothing else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from kiln.app import App
from kiln.envs.spec import Env
from kiln.record.runs import Dataset, log, save

LOSSES = ("log_loss", "hinge", "modified_huber")
ALPHAS = (1e-4, 1e-2)

app = App("demo")
env = Env(packages=["scikit-learn>=1.4"])


@app.function(cpu=1, timeout=600, env=env)
def prepare(path: str) -> str:
    """Write scikit-learn's bundled digits data to ``path`` as CSV (once); return the path.

    Saved as this run's artifact too, so lineage links it to every run that reads it."""
    written = write_digits(Path(path))
    save("digits.csv", written)
    return str(written)


@app.function(cpu=1, memory="256Mi", timeout=600, env=env)
def train(loss: str, alpha: float, epochs: int, data: Dataset) -> dict[str, Any]:
    """Train one SGD classifier on the digits CSV, logging accuracy every epoch."""
    return _train(data.path, loss=loss, alpha=alpha, epochs=epochs)


@app.endpoint(model="digits@production", env=env, min_replicas=0, max_replicas=2)
class Digits:
    """The promoted digits classifier behind HTTP: 64 pixel values in, a digit out."""

    def load(self, model_path: str) -> None:
        bundle = pickle.loads(Path(model_path).read_bytes())  # noqa: S301  our own artifact
        self.scaler, self.model = bundle["scaler"], bundle["model"]

    def predict(self, pixels: list[float]) -> dict[str, Any]:
        x = self.scaler.transform([pixels])
        return {"digit": int(self.model.predict(x)[0])}


def write_digits(path: Path) -> Path:
    """Write scikit-learn's bundled digits data to CSV (once), so it can be hashed as a file."""
    if not path.exists():
        from sklearn.datasets import load_digits

        digits = load_digits()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            ",".join([*(f"{x:g}" for x in row), str(label)])
            for row, label in zip(digits.data, digits.target, strict=True)
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return path


def _train(path: Path, *, loss: str, alpha: float, epochs: int) -> dict[str, Any]:
    import numpy as np
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    table = np.loadtxt(path, delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(int)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    model = SGDClassifier(loss=loss, alpha=alpha, random_state=0)
    classes = np.unique(y)
    for epoch in range(epochs):
        model.partial_fit(x_train, y_train, classes=classes)
        log(
            {
                "train_accuracy": model.score(x_train, y_train),
                "val_accuracy": model.score(x_val, y_val),
            },
            step=epoch,
        )
    save("model.pkl", {"scaler": scaler, "model": model})
    return {"val_accuracy": float(model.score(x_val, y_val)), "epochs": epochs}
