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
from fedlora.client import ClientOutcome
from fedlora.config import load_config
from fedlora.evaluate import evaluate_run
from fedlora.flower.simulate import simulate
from fedlora.flower.wire import from_record, read_reply, reply_content, to_record
from fedlora.lora import num_bytes
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


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and values; floats to 1e-6 (Ray's workers may use other thread counts)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), where
    else:
        assert b == a, where


def test_records_are_exact() -> None:
    tensors = {"layers.0.query.lora.A": torch.randn(4, 32), "head.bias": torch.tensor([0.5, -1.0])}
    record = to_record(tensors)
    back = from_record(record)
    for key, value in tensors.items():
        assert torch.equal(back[key], value)
    assert num_bytes(back) == (4 * 32 + 2) * 4


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
    received = EvalResult(correct=1.0, loss_sum=1.5, n=2, slot_weight_sums={"local": 0.5})
    outcome = ClientOutcome(update, {}, {"private.x": torch.zeros(1)}, row, result, 6, received)
    back = read_reply(reply_content(outcome))
    assert back.result == result and back.received == received
    assert back.private == {} and back.trainable_params == 6
    assert back.update.num_examples == 7 and back.update.metrics == {"train_loss": 0.5}
    assert back.row == row  # the server counts the bytes (fedlora.traffic), as in the simulator


def test_a_payload_crosses_the_wire_with_its_lr_multipliers() -> None:
    from fedlora.algorithms import Payload
    from fedlora.flower.wire import read_train, train_content
    from fedlora.lora import Layout, ModuleId, ModuleLayout, SlotSpec

    layout = Layout.uniform([ModuleId(0, "query")], ModuleLayout(slots=(SlotSpec("lora", 2, 4.0),)))
    payload = Payload(layout, {"layers.0.query.lora.A": torch.ones(2, 3)}, lr_multipliers={"*.mix.theta": 10.0})
    work = read_train(train_content("[run]\n", 3, 1, payload, {}, True))
    assert work.payload.lr_multipliers == {"*.mix.theta": 10.0} and work.rnd == 3 and work.client == 1
    assert torch.equal(work.payload.tensors["layers.0.query.lora.A"], torch.ones(2, 3))


def test_the_instruction_crosses_the_wire_as_plain_values() -> None:
    """FedDPA's client behaviour travels as a JSON instruction; the client builds the hooks
    class it finds in its own registry (never a class named in the message)."""
    from fedlora.algorithms import Payload
    from fedlora.algorithms.feddpa import FedDpa, SimilarityWeighting
    from fedlora.flower.wire import read_train, train_content
    from fedlora.lora import Layout

    payload = Payload(Layout({}), {}, instruction={"test_weighting": "instance", "mu": [0.5, 1]})
    meta = train_content("[run]\n", 0, 0, payload, {}, True).config_records["fedlora"]
    assert "class" not in str(meta["instruction"]) and "feddpa" not in str(meta["instruction"])
    work = read_train(train_content("[run]\n", 0, 0, payload, {}, True))
    assert work.payload.instruction == {"test_weighting": "instance", "mu": [0.5, 1]}
    hooks = FedDpa.client_hooks(work.payload.instruction)
    assert isinstance(hooks, SimilarityWeighting) and hooks.weights_instances
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = hooks.slot_weights(features, torch.tensor([1.0, 0.0]))  # cos = 1 and 0
    assert weights["local"].tolist() == [1.0, 0.5] and weights["global"].tolist() == [0.0, 0.5]


ALGORITHMS = sorted(registry())
#: Per algorithm, what makes two rounds exercise it: clustering after one warmup round, mixed ranks.
EXTRA = {
    "fedlease": ["algorithm.warmup_rounds=1"],
    # fixed_k = 2: every layer splits the 3 clients, so every module mixes two experts by a lambda.
    "fedtreelora": ["algorithm.warmup_rounds=1", "algorithm.fixed_k=2"],
    **{name: ["model.ranks=[2,4]"] for name in ("zeropad", "hetlora", "flexlora", "flora", "fedhl")},
}


def overrides_for(algorithm: str) -> list[str]:
    return [*TINY, f"algorithm.name='{algorithm}'", *EXTRA.get(algorithm, [])]


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every registered algorithm through Flower's simulation engine, on one start of it."""
    root = tmp_path_factory.mktemp("flower")
    runs = [(load_config(SMOKE, overrides_for(name)), root / name) for name in ALGORITHMS]
    simulate(runs, parallel=2)
    return {name: root / name for name in ALGORITHMS}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_simulation_equals_the_simulator(tmp_path: Path, algorithm: str, flower_runs: dict[str, Path]) -> None:
    sim_dir = tmp_path / "sim"
    overrides = [a for o in overrides_for(algorithm) for a in ("--set", o)]
    assert main(["run", str(SMOKE), "--out", str(sim_dir), "--quiet", *overrides]) == 0
    flower_dir = flower_runs[algorithm]
    assert_same(rows(sim_dir), rows(flower_dir), "metrics")
    sim_summary = json.loads((sim_dir / "summary.json").read_text())
    flower_summary = json.loads((flower_dir / "summary.json").read_text())
    for key in ("bytes_up_total", "bytes_down_total", "trainable_params", "structure", "num_clients"):
        assert_same(sim_summary[key], flower_summary[key], key)
    assert flower_summary["bytes_up_total"] > 0 or algorithm == "local"
    assert flower_summary["failures"] == []
    if algorithm == "fedtreelora":  # lambdas reach the summary through the clients' reports
        lambdas = flower_summary["structure"]["lambdas"]
        assert set(lambdas) == {"0", "1", "2"} and all(len(m) == 4 for m in lambdas.values())
        assert all(0.0 < v < 1.0 and v != 0.5 for m in lambdas.values() for v in m.values())
    assert (flower_dir / "plots" / "learning_curves.png").is_file()
    if algorithm == "fedhl":
        # A Flower run's checkpoints restore like the simulator's: the same model, scored per class.
        flower_eval, sim_eval = evaluate_run(flower_dir).to_json(), evaluate_run(sim_dir).to_json()
        assert {**flower_eval, "run_dir": ""} == {**sim_eval, "run_dir": ""}
