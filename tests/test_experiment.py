"""The Python API of ``fedlora.experiment``: what a notebook calls, the same code as the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.experiment import compare, parse_variant, run_experiment

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def _measured(key: str) -> bool:
    """Keys a rerun does not reproduce: wall times and memory peaks."""
    return "seconds" in key or "peak" in key or "wall" in key


def _deterministic(value: Any) -> Any:
    """``value`` (a summary, a row, a table) without its measured times and memory."""
    if isinstance(value, dict):
        return {k: _deterministic(v) for k, v in value.items() if not _measured(k)}
    if isinstance(value, list):
        return [_deterministic(v) for v in value]
    return value


def _metrics(run_dir: Path) -> list[Any]:
    return [_deterministic(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_experiment_returns_the_summary_the_cli_writes(tmp_path: Path) -> None:
    config = load_config(SMOKE, ["run.rounds=1"])
    summary = run_experiment(config, tmp_path / "api")
    assert summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert summary["algorithm"] == "fedit" and summary["rounds"] == 1
    assert main(["run", str(SMOKE), "--set", "run.rounds=1", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert _deterministic(json.loads((tmp_path / "cli" / "summary.json").read_text())) == _deterministic(summary)
    with pytest.raises(FedLoraError, match="already holds a run"):
        run_experiment(config, tmp_path / "api")


def test_compare_with_two_jobs_equals_sequential(tmp_path: Path) -> None:
    config = load_config(SMOKE, ["run.rounds=2"])
    algorithms = ["fedit", "fedtreelora:warmup_rounds=1"]
    sequential = compare(config, algorithms, out=tmp_path / "seq")
    parallel = compare(config, algorithms, out=tmp_path / "par", jobs=2)
    assert list(parallel.summaries) == algorithms
    assert parallel.run_dirs == [tmp_path / "par" / "fedit_s0", tmp_path / "par" / "fedtreelora_warmup_rounds-1_s0"]
    for spec in algorithms:
        (seq,), (par,) = sequential.summaries[spec], parallel.summaries[spec]
        assert _deterministic(par) == _deterministic(seq)
        assert seq["final"]["personalized_acc_mean"] is not None
    for seq_dir, par_dir in zip(sequential.run_dirs, parallel.run_dirs, strict=True):
        assert _metrics(par_dir) == _metrics(seq_dir)
    # the table holds the same numbers; only the wall and memory columns may differ
    assert _deterministic(parallel.table) == _deterministic(sequential.table)
    assert (tmp_path / "par" / "comparison.md").read_text() == parallel.markdown
    # the base config is not changed by the runs
    assert config.algorithm_name == "fedit" and config.run.seed == 0


def test_compare_checks_its_arguments(tmp_path: Path) -> None:
    config = load_config(SMOKE)
    with pytest.raises(FedLoraError, match="--jobs 0"):
        compare(config, ["fedit"], out=tmp_path, jobs=0)
    with pytest.raises(FedLoraError, match="names no algorithm"):
        compare(config, [" ", ""], out=tmp_path)
    with pytest.raises(FedLoraError, match="one of them"):
        compare(config, ["fedit"], out=tmp_path, reuse=True, overwrite=True)
    assert not any(tmp_path.iterdir())


def test_a_failing_run_in_a_worker_raises_its_error(tmp_path: Path) -> None:
    config = load_config(SMOKE, ["model.name='no-such-model'"])
    with pytest.raises(FedLoraError, match="unknown model 'no-such-model'"):
        compare(config, ["fedit", "local"], out=tmp_path, jobs=2)
    assert not (tmp_path / "comparison.md").exists()


def test_parse_variant_reads_values_as_toml() -> None:
    assert parse_variant("fedtreelora:fixed_k=4:tau=0.3:name_like=abc") == (
        "fedtreelora",
        {"fixed_k": 4, "tau": 0.3, "name_like": "abc"},
    )
    assert parse_variant(" fedit ") == ("fedit", {})
    with pytest.raises(FedLoraError, match="expected name:key=value"):
        parse_variant("fedit:uniform")
