"""The public surface changes only on purpose."""

import subprocess
import sys

import kiln

EXPECTED = {
    "ActiveRun",
    "App",
    "Artifact",
    "Dataset",
    "Env",
    "Function",
    "KilnError",
    "MapResult",
    "MetricPoint",
    "Run",
    "RunFailed",
    "Preempted",
    "RunRecord",
    "RunStatus",
    "Sandbox",
    "Settings",
    "Sweep",
    "__version__",
    "get_run",
    "grid",
    "pareto",
    "log",
    "runs",
    "save",
    "checkpoint",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(kiln.__all__) == EXPECTED
    for name in kiln.__all__:
        assert getattr(kiln, name) is not None


def test_public_callables_have_docstrings() -> None:
    for name in kiln.__all__:
        obj = getattr(kiln, name)
        if callable(obj):
            assert obj.__doc__, f"kiln.{name} has no docstring"


def test_import_kiln_stays_light() -> None:
    """Heavy modules load on first use, not on import."""
    heavy = ("sqlalchemy", "alembic", "typer", "rich", "psycopg", "sklearn", "numpy",
             "cloudpickle", "packaging", "uv")  # fmt: skip
    code = f"import sys, kiln; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
