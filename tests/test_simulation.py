"""End-to-end runs of the simulator through the CLI on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedlora.cli import main
from helpers import run_rows

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def test_run_writes_the_output_contract(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(out), "--quiet"]) == 0
    assert (out / "config.toml").is_file()
    assert (out / "plots" / "learning_curves.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "algorithm",
        "dataset",
        "model",
        "num_clients",
        "rounds",
        "seed",
        "final",
        "best",
        "wall_seconds",
        "bytes_up_total",
        "bytes_down_total",
        "structure",
    ):
        assert key in summary
    rows = run_rows(out)
    aggregates = [r for r in rows if r["client"] is None]
    assert [r["round"] for r in aggregates] == [0, 1]
    final = aggregates[-1]
    for key in ("personalized_acc_mean", "personalized_acc_std", "global_acc", "bytes_up", "bytes_down"):
        assert final[key] is not None
    clients = [r for r in rows if r["client"] is not None and r["round"] == 1]
    assert len(clients) == 4
    # fedit: every client downloads and uploads one full LoRA (A and B of 4 modules, rank 4, fp32).
    # tiny-bert: 2 layers x (query, value), hidden 32: per module A 4x32 + B 32x4 = 256 floats.
    lora_bytes = 2 * 2 * 256 * 4
    assert all(r["bytes_up"] == lora_bytes and r["bytes_down"] == lora_bytes for r in clients)
    assert summary["bytes_up_total"] == 2 * 4 * lora_bytes
    weighted = sum(r["acc"] * r["n"] for r in clients) / sum(r["n"] for r in clients)
    assert final["personalized_acc_weighted"] == pytest.approx(weighted)


def test_resume_gives_identical_metrics(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    common = ["--set", "run.rounds=4", "--quiet"]
    assert main(["run", SMOKE, "--out", str(straight), *common]) == 0
    assert main(["run", SMOKE, "--out", str(resumed), "--set", "run.rounds=2", "--quiet"]) == 0
    assert main(["run", "--resume", str(resumed), *common]) == 0
    assert run_rows(straight) == run_rows(resumed)


def test_local_head_is_private_and_federated_head_is_counted(tmp_path: Path) -> None:
    local = tmp_path / "local"
    fed = tmp_path / "fed"
    assert main(["run", SMOKE, "--out", str(local), "--set", "model.head='local'", "--quiet"]) == 0
    assert main(["run", SMOKE, "--out", str(fed), "--set", "model.head='federated'", "--quiet"]) == 0
    up_local = json.loads((local / "summary.json").read_text())["bytes_up_total"]
    up_fed = json.loads((fed / "summary.json").read_text())["bytes_up_total"]
    head_bytes = (32 * 2 + 2) * 4  # classifier weight 2x32 + bias 2, fp32
    assert up_fed - up_local == 2 * 4 * head_bytes


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(out), "--set", "run.rounds=1", "--quiet"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", SMOKE, "--out", str(out), "--set", "run.rounds=1", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def _write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "unknown key train.lrr"),
        (["algorithm.name='fedavgg'"], "unknown algorithm 'fedavgg'"),
        (["algorithm.nonsense=1"], "has no option nonsense"),
        (["model.name='bert-huge'"], "bert-huge"),
        (["data.dataset='imdb'"], "imdb"),
        (["data.alpha=0"], "must be > 0"),
        (["federation.fraction=2.0"], "must be in"),
        (["data.num_clients=20000"], "20000"),
        (["data.dataset='csv:/no/such/file.csv'"], "/no/such/file.csv"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    args = ["run", SMOKE, "--out", str(tmp_path / "run"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("fedlora: error:")


def test_malformed_csv_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _write_csv(tmp_path / "bad.csv", "sentence,label\nhello,1\nworld,0\n")
    assert main(["run", SMOKE, "--out", str(tmp_path / "run"), "--set", f"data.dataset='csv:{csv}'", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "Traceback" not in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "/no/such/config.toml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_user_csv_with_natural_clients(tmp_path: Path) -> None:
    lines = ["text,label,client"]
    for i in range(60):
        lines.append(f"{'good great fine' if i % 2 else 'bad awful poor'} movie number {i},{i % 2},site{i % 3}")
    csv = _write_csv(tmp_path / "mine.csv", "\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = [
        "run",
        SMOKE,
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"data.dataset='csv:{csv}'",
        "--set",
        "data.partition='natural'",
        "--set",
        "data.num_clients=3",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 3


def test_compare_writes_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        SMOKE,
        "--algorithms",
        "local,fedit,ffa",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "run.rounds=1",
    ]
    assert main(args) == 0
    table = (out / "comparison.md").read_text()
    for name in ("local", "fedit", "ffa"):
        assert f"| {name} |" in table
    data = json.loads((out / "comparison.json").read_text())
    assert data["local"]["bytes_up_per_round"] == 0
    assert data["fedit"]["seeds"] == [0, 1]
    # ffa uploads B only: half of fedit's upload at equal shapes (A 4x32 and B 32x4).
    assert data["ffa"]["bytes_up_per_round"] == data["fedit"]["bytes_up_per_round"] / 2
    assert "local_s1" in capsys.readouterr().out


def test_list_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("fedit", "ffa", "local", "minilm-l6", "tiny-bert", "rotten_tomatoes", "dirichlet", "csv:"):
        assert name in text
    out = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(out), "--set", "run.rounds=1", "--quiet"]) == 0
    (out / "plots" / "learning_curves.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "plots" / "learning_curves.png").is_file()
    assert main(["report", str(tmp_path)]) == 2


def _fake_run(run_dir: Path, algorithm: str, per_round: list[tuple[float | None, float | None]]) -> Path:
    """A finished run directory by hand: one aggregate row per round with (score, test loss)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"algorithm": algorithm, "metric": "accuracy"}))
    rows = [
        {"round": 0, "client": 0, "acc": 0.5},
        *(
            {"round": r, "client": None, "personalized_acc_mean": acc, "personalized_loss_mean": loss}
            for r, (acc, loss) in enumerate(per_round)
        ),
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_report_compare_draws_several_runs(tmp_path: Path) -> None:
    from fedlora.report import run_curves

    a = _fake_run(tmp_path / "a", "local", [(0.5, 1.5), (None, None), (0.75, 1.25)])
    b = _fake_run(tmp_path / "b", "fedit", [(0.25, 1.75), (0.5, 1.5), (1.0, 1.0)])
    # rounds count from 1; a round that was not evaluated is left out
    assert run_curves(a) == {
        "algorithm": "local",
        "metric": "accuracy",
        "protocol": "trained",
        "rounds": [1, 3],
        "score": [0.5, 0.75],
        "loss": [1.5, 1.25],
    }
    assert run_curves(b)["rounds"] == [1, 2, 3]
    out = tmp_path / "img" / "both.png"
    assert main(["report", str(a), str(b), "--compare", str(out), "--labels", "mine,shared"]) == 0
    assert out.is_file() and out.stat().st_size > 0
    # one label per run, --labels only with --compare, and every directory must be a finished run
    assert main(["report", str(a), str(b), "--compare", str(out), "--labels", "mine"]) == 2
    assert main(["report", str(a), "--labels", "mine"]) == 2
    assert main(["report", str(a), str(tmp_path), "--compare", str(out)]) == 2


def test_report_compare_averages_runs_with_one_label(tmp_path: Path) -> None:
    from fedlora.report import group_curves, run_curves

    s0 = _fake_run(tmp_path / "s0", "fedit", [(0.5, 1.5), (0.7, 1.25), (0.75, 1.0)])
    s1 = _fake_run(tmp_path / "s1", "fedit", [(0.7, 1.0), (None, None), (0.95, 0.5)])
    other = _fake_run(tmp_path / "o", "local", [(0.25, 2.0)])
    groups = group_curves([run_curves(d) for d in (s0, s1, other)], ["fedit", "fedit", "local"])
    assert [g["label"] for g in groups] == ["fedit", "local"]
    fedit = groups[0]
    # round 2 was not evaluated in s1: only rounds 1 and 3 are common
    assert fedit["runs"] == 2 and fedit["rounds"] == [1, 3]
    assert fedit["score_mean"] == pytest.approx([0.6, 0.85])
    assert fedit["score_std"] == pytest.approx([0.1, 0.1])
    assert fedit["loss_mean"] == pytest.approx([1.25, 0.75])
    assert groups[1]["score_std"] == [0.0]
    out = tmp_path / "seeds.png"
    assert main(["report", str(s0), str(s1), str(other), "--compare", str(out), "--labels", "fedit,fedit,local"]) == 0
    assert out.stat().st_size > 0


def test_compare_algorithm_variants(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", SMOKE, "--algorithms", "fedit,fedit:weighting='uniform'", "--out", str(out), "--quiet",
            "--set", "run.rounds=1"]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert set(data) == {"fedit", "fedit:weighting='uniform'"}
    config = (out / "fedit_weighting-'uniform'_s0" / "config.toml").read_text()
    assert 'weighting = "uniform"' in config


def test_compare_rejects_bad_variant_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", SMOKE, "--algorithms", "fedit,fedit:weighting=median", "--out", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 2
    assert "'examples' or 'uniform'" in capsys.readouterr().err
    assert not (tmp_path / "c" / "fedit_s0").exists()


def test_compare_reuse_keeps_continues_extends_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    straight = tmp_path / "straight"
    assert main(["run", SMOKE, "--out", str(straight), "--quiet"]) == 0  # smoke.toml: 2 rounds of fedit
    out = tmp_path / "cmp"
    base = ["compare", SMOKE, "--algorithms", "fedit", "--out", str(out), "--quiet"]
    run_dir = out / "fedit_s0"
    assert main([*base, "--set", "run.rounds=1"]) == 0
    one_round = (run_dir / "metrics.jsonl").read_text()

    # same settings, same length: read back, nothing rerun
    assert main([*base, "--set", "run.rounds=1", "--reuse"]) == 0
    assert (run_dir / "metrics.jsonl").read_text() == one_round
    # shorter than asked: extended from its last checkpoint, identical to a straight 2-round run
    assert main([*base, "--reuse"]) == 0
    assert run_rows(run_dir) == run_rows(straight)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    # interrupted (summary and latest checkpoint gone): continued from the newest checkpoint left
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "round_00002")
    assert main([*base, "--reuse"]) == 0
    assert run_rows(run_dir) == run_rows(straight)

    capsys.readouterr()
    assert main([*base, "--set", "train.lr=0.5", "--reuse"]) == 2
    assert "train.lr = 0.001 there, 0.5 here" in capsys.readouterr().err
    assert main([*base, "--set", "run.rounds=1", "--reuse"]) == 2
    assert "holds a 2-round run, asked for 1" in capsys.readouterr().err
    assert main([*base, "--reuse", "--overwrite"]) == 2
    assert run_rows(run_dir) == run_rows(straight)
    stray = tmp_path / "stray"
    (stray / "fedit_s0").mkdir(parents=True)
    (stray / "fedit_s0" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["compare", SMOKE, "--algorithms", "fedit", "--out", str(stray), "--quiet", "--reuse"]) == 2
    assert "holds no fedlora run" in capsys.readouterr().err
    assert (stray / "fedit_s0" / "notes.txt").read_text() == "mine"


def test_reuse_run_fills_in_option_defaults(tmp_path: Path) -> None:
    from fedlora.cli import reuse_run
    from fedlora.config import load_config

    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(run_dir), "--set", "run.rounds=1", "--quiet"]) == 0
    before = (run_dir / "summary.json").read_text()
    # fedit's default weighting spelled out is the same setting: the run is read back
    config = load_config(Path(SMOKE), ["run.rounds=1", "algorithm.weighting='examples'"])
    assert reuse_run(config, run_dir, quiet=True) == json.loads(before)
    assert (run_dir / "summary.json").read_text() == before
