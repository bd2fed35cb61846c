"""Lineage across a two-step pipeline, on every store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import kiln
from kiln.cli import app as cli
from kiln.config import Settings


def pipeline(tmp_path: Path, scale: int) -> tuple[str, str]:
    """prepare writes data; train reads it (as a Dataset of the same bytes) and saves a model."""
    app = kiln.App("pipe")
    data_file = tmp_path / f"data-{scale}.csv"
    with app.run(params={"scale": scale}, name="prepare") as prep:
        data_file.write_text("\n".join(str(i * scale) for i in range(10)))
        kiln.save("data.csv", data_file)
    with app.run(params={"data": kiln.Dataset(data_file)}, name="train") as train:
        kiln.save("model.bin", f"model of {scale}".encode())
    return prep.id, train.id


def test_lineage_links_runs_through_the_hashes_of_what_they_pass(
    settings: Settings, tmp_path: Path
) -> None:
    prep1, train1 = pipeline(tmp_path, 1)
    prep2, train2 = pipeline(tmp_path, 2)
    graph = kiln.get_run(train1).lineage()
    data_sha = kiln.get_run(prep1).artifact("data.csv").sha256
    model_sha = kiln.get_run(train1).artifact("model.bin").sha256
    assert graph.upstream(train1) == [data_sha]
    assert graph.upstream(data_sha) == [prep1]
    assert graph.downstream(train1) == [model_sha]
    assert prep2 not in graph.runs and train2 not in graph.runs  # the other chain stays apart
    assert (prep1, data_sha, "produced") in graph.edges
    assert (data_sha, train1, "consumed") in graph.edges
    # from an artifact: its producer upstream, its consumer downstream
    by_artifact = kiln.get_run(prep2).lineage()
    assert train2 in by_artifact.runs and train1 not in by_artifact.runs


def test_an_artifact_passed_to_a_function_links_the_runs(settings: Settings) -> None:
    app = kiln.App("pipe-fn")
    with app.run() as first:
        kiln.save("weights", b"w1")
    weights = kiln.get_run(first.id).artifact("weights")

    @app.function()
    def evaluate(model: kiln.Artifact) -> dict:
        return {"size": model.size}

    assert evaluate.remote(weights) == {"size": 2}
    (second,) = [r for r in kiln.runs(app="pipe-fn") if r.id != first.id]
    assert second.params["model"] == {"artifact": "weights", "sha256": weights.sha256}
    assert kiln.get_run(first.id).lineage().downstream(weights.sha256) == [second.id]


def test_kiln_lineage_prints_trees_json_and_dot(settings: Settings, tmp_path: Path) -> None:
    prep, train = pipeline(tmp_path, 3)
    runner = CliRunner()
    tree = runner.invoke(cli, ["lineage", train[:10]])
    assert tree.exit_code == 0, tree.output
    assert "upstream" in tree.output and prep[:8] in tree.output and "data-3.csv" in tree.output
    assert "pipe/prepare (succeeded)" in tree.output
    data = json.loads(runner.invoke(cli, ["lineage", train, "--json"]).output)
    assert data["root"] == train and {e["kind"] for e in data["edges"]} == {"consumed", "produced"}
    dot = runner.invoke(cli, ["lineage", train, "--dot"]).output
    assert dot.startswith("digraph lineage") and f'"{prep}" ->' in dot
    sha = kiln.get_run(prep).artifact("data.csv").sha256
    by_sha = json.loads(runner.invoke(cli, ["lineage", sha[:12], "--json"]).output)
    assert by_sha["root"] == sha and train in by_sha["runs"]
    missing = runner.invoke(cli, ["lineage", "ffffffffffff"])
    assert missing.exit_code != 0
