"""Short CLI runs of the personalized baselines on configs/smoke.toml, and their exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.simulation import Simulation

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")
# tiny-bert: 2 layers x (query, value), hidden 32, rank 4: A and B of one module are 2 x 128 floats.
LORA_BYTES = 4 * 256 * 4
ROUTER_BYTES = 4 * (2 * 32 + 2) * 4


def _run(tmp_path: Path, algorithm: str, *options: str) -> tuple[Path, dict, list[dict]]:  # type: ignore[type-arg]
    run = tmp_path / "run"
    sets = [f"algorithm.name='{algorithm}'", "train.lr=0.05", *options]
    args = ["run", SMOKE, "--out", str(run), "--quiet"] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, summary, [r for r in rows if r["client"] is not None]


@pytest.mark.parametrize(
    ("algorithm", "options", "up", "down"),
    [
        ("fedsa", (), LORA_BYTES // 2, LORA_BYTES // 2),
        ("sharedepth", ("algorithm.share='shallow:1'",), LORA_BYTES // 2, LORA_BYTES // 2),
        ("feddpa", (), LORA_BYTES, LORA_BYTES),
        ("fedalt", (), LORA_BYTES + ROUTER_BYTES, LORA_BYTES + ROUTER_BYTES),
    ],
)
def test_smoke_runs_and_bytes(tmp_path: Path, algorithm: str, options: tuple[str, ...], up: int, down: int) -> None:
    _, summary, rows = _run(tmp_path, algorithm, *options)
    assert summary["algorithm"] == algorithm
    # the final personalized score is the mean over the last round's clients of correct / 16
    last = [r for r in rows if r["round"] == summary["rounds"] - 1]
    assert len(last) == 4 and all(r["n"] == 16 and r["acc"] * 16 == round(r["acc"] * 16) for r in last)
    assert summary["final"]["personalized_acc_mean"] == pytest.approx(sum(r["acc"] for r in last) / 4)
    assert all(r["bytes_up"] == up and r["bytes_down"] == down for r in rows)


def test_smoke_fedex_counts_the_dense_residual(tmp_path: Path) -> None:
    _, summary, rows = _run(tmp_path, "fedex")
    dense = 4 * 32 * 32 * 4
    assert {r["bytes_down"] for r in rows if r["round"] == 0} == {LORA_BYTES}
    assert {r["bytes_down"] for r in rows if r["round"] == 1} == {LORA_BYTES + dense}
    assert len(summary["structure"]["residual_fro_norm_per_round"]) == 2
    assert summary["final"]["global_acc"] is not None


def test_smoke_fedlease_structure(tmp_path: Path) -> None:
    _, summary, rows = _run(tmp_path, "fedlease", "algorithm.warmup_rounds=1")
    m = summary["structure"]["num_clusters"]
    assert 2 <= m <= 3 and sorted(summary["structure"]["clusters"]) == ["0", "1", "2", "3"]
    assert {r["bytes_down"] for r in rows if r["round"] == 0} == {0}
    router = 4 * (m * 32 + m) * 4
    assert {r["bytes_down"] for r in rows if r["round"] == 1} == {m * LORA_BYTES + router}


def test_feddpa_reports_test_time_weights(tmp_path: Path) -> None:
    _, summary, rows = _run(tmp_path, "feddpa")
    weights = [r["weight_local"] for r in rows]
    assert all(0.0 <= w <= 1.0 for w in weights) and len(set(weights)) > 1
    assert len(summary["structure"]["test_local_weight_per_round"]) == 2


def _our_logits(run_dir: Path, client: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], str, int]:
    sim = Simulation(load_config(run_dir / "config.toml"), run_dir)
    sim.resume()
    fed = sim.fed
    payload = fed.algorithm.configure(sim.next_round, [client])[client]
    fed.runner.load(payload, sim.store.get(client), fed.head.payload())
    batch = fed.corpus.batch(fed.test_union[:12])
    with torch.no_grad():
        logits = fed.lora_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch, fed.loaded.source, len(fed.dataset.label_names)


@pytest.mark.parametrize(
    ("algorithm", "options"),
    [("fedsa", ()), ("sharedepth", ("algorithm.share='deep:1'",)), ("feddpa", ("algorithm.test_weighting='fixed'",))],
)
def test_peft_export_of_personalized_models(tmp_path: Path, algorithm: str, options: tuple[str, ...]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run, _, _ = _run(tmp_path, algorithm, *options)
    assert main(["export", str(run), "--client", "1", "--out", str(tmp_path / "adapter")]) == 0
    ours, batch, source, num_labels = _our_logits(run, 1)
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_merged_export_of_fedex(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    run, _, _ = _run(tmp_path, "fedex")
    assert main(["export", str(run), "--client", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--merged" in capsys.readouterr().err
    assert main(["export", str(run), "--client", "2", "--merged", "--out", str(tmp_path / "merged")]) == 0
    ours, batch, _, _ = _our_logits(run, 2)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("algorithm", "message"), [("fedalt", "input-dependent"), ("feddpa", "per input")])
def test_input_dependent_models_refuse_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str, message: str
) -> None:
    run, _, _ = _run(tmp_path, algorithm, "run.rounds=1")
    assert main(["export", str(run), "--client", "0", "--merged", "--out", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err
