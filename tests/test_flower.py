"""The Flower runtime gives the simulator's results (through Flower's simulation engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from fedlora.algorithms import Update, registry
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.flower.simulate import simulate
from fedlora.flower.wire import from_record, read_reply, record_bytes, reply_content, to_record
from fedlora.simulation import ClientOutcome
from fedlora.tasks import EvalResult

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"
#: Three clients keep Ray's actors few on a 2-core machine.
TINY = ["data.num_clients=3", "model.head='federated'"]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in out:
        row.pop("seconds", None)
    return out


def assert_same_metrics(sim: list[dict[str, Any]], flower: list[dict[str, Any]]) -> None:
    assert len(sim) == len(flower)
    for a, b in zip(sim, flower, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-6), (key, a, b)
            else:
                assert b[key] == value, (key, a, b)


def test_records_are_exact_and_counted_without_framing() -> None:
    tensors = {"layers.0.query.lora.A": torch.randn(4, 32), "head.bias": torch.tensor([0.5, -1.0])}
    record = to_record(tensors)
    back = from_record(record)
    for key, value in tensors.items():
        assert torch.equal(back[key], value)
    assert record_bytes(record) == (4 * 32 + 2) * 4


def test_a_reply_carries_the_whole_evaluation() -> None:
    # A generation client's result: ROUGE sums, per-group sums, samples and FedDPA's weights.
    result = EvalResult(
        correct=1.25,
        loss_sum=3.5,
        n=2,
        metric_sums={"rouge1": 1.25, "exact_match": 1.0},
        groups={"topic": {"n": 2.0, "rouge1": 1.25, "exact_match": 1.0}},
        samples=[{"prediction": "sport", "reference": "sport"}],
        slot_weight_sums={"local": 0.75},
    )
    update = Update({"layers.0.query.lora.A": torch.ones(2, 3)}, 7, {"train_loss": 0.5})
    row = {"round": 1, "client": 2, "acc": 0.625, "bytes_up": 0}
    outcome = ClientOutcome(update, {}, {"private.x": torch.zeros(1)}, row, result, 6)
    back = read_reply(reply_content(outcome))
    assert back.result == result
    assert back.private == {} and back.trainable_params == 6
    assert back.update.num_examples == 7 and back.update.metrics == {"train_loss": 0.5}
    assert back.row == {**row, "bytes_up": 2 * 3 * 4}


ALGORITHMS = sorted(registry())


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every registered algorithm through Flower's simulation engine, on one start of it."""
    root = tmp_path_factory.mktemp("flower")
    runs = [(load_config(SMOKE, [*TINY, f"algorithm.name='{name}'"]), root / name) for name in ALGORITHMS]
    simulate(runs, parallel=2)
    return {name: root / name for name in ALGORITHMS}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_simulation_equals_the_simulator(tmp_path: Path, algorithm: str, flower_runs: dict[str, Path]) -> None:
    sim_dir = tmp_path / "sim"
    overrides = [a for o in [*TINY, f"algorithm.name='{algorithm}'"] for a in ("--set", o)]
    assert main(["run", str(SMOKE), "--out", str(sim_dir), "--quiet", *overrides]) == 0
    flower_dir = flower_runs[algorithm]
    assert_same_metrics(rows(sim_dir), rows(flower_dir))
    sim_summary = json.loads((sim_dir / "summary.json").read_text())
    flower_summary = json.loads((flower_dir / "summary.json").read_text())
    for key in ("bytes_up_total", "bytes_down_total", "trainable_params", "structure", "num_clients"):
        assert flower_summary[key] == sim_summary[key]
    assert flower_summary["bytes_up_total"] > 0 or algorithm == "local"
    assert (flower_dir / "plots" / "learning_curves.png").is_file()
