"""``fedlora evaluate``: per-class scores that add up to the run's own figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.cli import main
from fedlora.evaluate import evaluate_run

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def _run(out: Path, algorithm: str, *extra: str) -> Path:
    args = ["run", SMOKE, "--out", str(out), "--set", f"algorithm.name='{algorithm}'", "--quiet", *extra]
    assert main(args) == 0
    return out


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_global_per_class_adds_up_to_the_runs_global_score_and_training_split(tmp_path: Path) -> None:
    run = _run(tmp_path / "fedhl", "fedhl", "--set", "model.ranks=[2,4,8]")
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    result = evaluate_run(run)
    assert result.model == "global" and result.rounds_done == 2
    clients = [r for r in _rows(run) if r["client"] is not None and r["round"] == 1]
    # The union of the four clients' test splits, each scored once.
    assert result.n == sum(r["n"] for r in clients) == sum(c.n for c in result.classes)
    assert [c.name for c in result.classes] == ["rotten", "fresh"]
    assert result.acc == pytest.approx(final["global_acc"], abs=1e-12)
    assert result.loss == pytest.approx(final["global_loss"], rel=1e-5)
    # Clients 0..3 hold ranks 2, 4, 8, 2 (round-robin): training examples per rank from the run's rows.
    expected = {2: 0, 4: 0, 8: 0}
    for r in clients:
        expected[summary["ranks"][str(r["client"])]] += r["n_train"]
    got = {rank: sum(c.train_by_rank.get(rank, 0) for c in result.classes) for rank in expected}
    assert got == expected
    assert all(c.train == sum(c.train_by_rank.values()) for c in result.classes)
    last = result.table().splitlines()[-1]
    assert last.startswith(f"| all | {result.n} | {100 * result.acc:.1f} |")


def test_client_model_matches_its_last_row_and_local_has_no_global(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path / "local", "local")
    row = next(r for r in _rows(run) if r["client"] == 2 and r["round"] == 1)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--client", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["model"] == "client 2"
    assert result["n"] == row["n"]
    assert result["acc"] == pytest.approx(row["acc"], abs=1e-12)
    assert sum(c["train"] for c in result["classes"]) == row["n_train"]
    assert main(["evaluate", str(run)]) == 2
    assert "no global model" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--client", "9"]) == 2
    assert "clients 0..3" in capsys.readouterr().err


def test_a_class_missing_from_a_client_split_prints_a_dash(tmp_path: Path) -> None:
    # pathological, one class per client: each client's test split holds one class only.
    run = _run(
        tmp_path / "local1",
        "local",
        "--set",
        "data.partition='pathological'",
        "--set",
        "data.classes_per_client=1",
        "--set",
        "run.rounds=1",
    )
    result = evaluate_run(run, client=0)
    empty = [c for c in result.classes if c.n == 0]
    assert len(empty) == 1 and empty[0].acc is None and empty[0].loss is None
    assert f"| {empty[0].name} | 0 | - | - |" in result.table()
    json.dumps(result.to_json(), allow_nan=False)  # no NaN: the --json output is strict JSON
