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
from fedlora.errors import FedLoraError
from fedlora.evaluate import evaluate_run
from fedlora.flower.simulate import simulate
from fedlora.flower.wire import from_record, read_reply, reply_content, to_record
from fedlora.lora import num_bytes
from fedlora.tasks import EvalResult
from helpers import run_rows

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"
#: Three clients keep Ray's actors few on a 2-core machine.
TINY = ["data.num_clients=3", "model.head='federated'"]


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


#: Differential privacy in both runtimes: the server's clipping and noise (with the adaptive
#: bound) and each client's own noise.
DP_RUNS = {
    "fedit+central_dp": [
        *overrides_for("fedit"),
        "algorithm.weighting='uniform'",
        "privacy.mode='central'",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=0.05",
        "privacy.adaptive_clip=true",
        "privacy.clipped_count_stddev=1.0",
    ],
    "fedsa+local_dp": [*overrides_for("fedsa"), "privacy.mode='local'", "privacy.target_epsilon=20.0"],
}


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every registered algorithm through Flower's simulation engine, on one start of it."""
    root = tmp_path_factory.mktemp("flower")
    overrides = {**{name: overrides_for(name) for name in ALGORITHMS}, **DP_RUNS}
    runs = [(load_config(SMOKE, o), root / name) for name, o in overrides.items()]
    simulate(runs, parallel=2)
    return {name: root / name for name in overrides}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_simulation_equals_the_simulator(tmp_path: Path, algorithm: str, flower_runs: dict[str, Path]) -> None:
    sim_dir = tmp_path / "sim"
    overrides = [a for o in overrides_for(algorithm) for a in ("--set", o)]
    assert main(["run", str(SMOKE), "--out", str(sim_dir), "--quiet", *overrides]) == 0
    flower_dir = flower_runs[algorithm]
    assert_same(run_rows(sim_dir), run_rows(flower_dir), "metrics")
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


def test_gpu_share_is_refused_without_a_gpu_and_passed_to_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlora.flower import simulate as simulate_module

    if not torch.cuda.is_available():
        code = main(["flower", "simulate", str(SMOKE), "--out", str(tmp_path / "r"), "--gpus-per-client", "0.5"])
        assert code == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    # With a GPU present, the share reaches Flower's backend config; a run left on the CPU is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen: dict[str, Any] = {}
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda **kwargs: seen.update(kwargs))
    cpu_config = load_config(SMOKE)
    with pytest.raises(FedLoraError, match=r"run\.device"):
        simulate_module.simulate([(cpu_config, tmp_path / "cpu")], gpus_per_client=0.25)
    gpu_config = load_config(SMOKE, ["run.device='cuda'"])
    with pytest.raises(FedLoraError, match="did not finish"):  # the stub runs nothing
        simulate_module.simulate([(gpu_config, tmp_path / "gpu")], gpus_per_client=0.25)
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    with pytest.raises(FedLoraError, match=r"\[0, 1\]"):
        simulate_module.simulate([(gpu_config, tmp_path / "gpu")], gpus_per_client=2)


def test_an_embedded_simulation_waits_for_its_engine_not_for_remote_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.flower import simulate as simulate_module
    from fedlora.flower.server import ServerOptions

    seen: list[ServerOptions | None] = []
    monkeypatch.setattr(simulate_module, "make_server_app", lambda runs, options: seen.append(options))
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda **kwargs: None)
    runs = [(load_config(SMOKE), tmp_path / "r")]
    for options in (None, ServerOptions(node_wait=5.0)):
        with pytest.raises(FedLoraError, match="did not finish"):  # the stub runs nothing
            simulate_module.simulate(runs, options=options)
    # 900 s by default (a loaded machine took over 120 s to start the engine); given options win.
    assert [o.node_wait for o in seen if o is not None] == [900.0, 5.0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DP_RUNS))
def test_differential_privacy_is_the_same_in_both_runtimes(
    tmp_path: Path, name: str, flower_runs: dict[str, Path]
) -> None:
    sim_dir = tmp_path / "sim"
    overrides = [a for o in DP_RUNS[name] for a in ("--set", o)]
    assert main(["run", str(SMOKE), "--out", str(sim_dir), "--quiet", *overrides]) == 0
    sim_rows, flower_rows = run_rows(sim_dir), run_rows(flower_runs[name])
    assert_same(sim_rows, flower_rows, "metrics")
    aggregates = [r for r in flower_rows if r["client"] is None]
    assert all(r["dp_epsilon"] > 0 for r in aggregates)
    sim_summary = json.loads((sim_dir / "summary.json").read_text())
    flower_summary = json.loads((flower_runs[name] / "summary.json").read_text())
    assert_same(sim_summary["privacy"], flower_summary["privacy"], "privacy")


def assert_close_rows(plain: Any, secure: Any, tol: float, where: str = "") -> None:
    """Equal structure; floats within ``tol`` (SecAgg+ quantization), everything else equal."""
    if isinstance(plain, dict):
        assert isinstance(secure, dict) and plain.keys() == secure.keys(), where
        for key in plain:
            assert_close_rows(plain[key], secure[key], tol, f"{where}.{key}")
    elif isinstance(plain, list):
        assert isinstance(secure, list) and len(plain) == len(secure), where
        for i, (x, y) in enumerate(zip(plain, secure, strict=True)):
            assert_close_rows(x, y, tol, f"{where}[{i}]")
    elif isinstance(plain, float):
        assert secure == pytest.approx(plain, abs=tol), where
    else:
        assert secure == plain, where


#: Sum-aggregated methods under SecAgg+: fedit with a federated head (every tensor securely
#: summed, example weights), fedsa (A summed, B private; uniform weights).
SECAGG_RUNS = {
    "fedit": overrides_for("fedit"),
    "fedsa": [*overrides_for("fedsa"), "algorithm.weighting='uniform'"],
}


@pytest.mark.slow
def test_secure_aggregation_hides_every_update_and_keeps_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.compat.common.recorddict_compat as compat

    # Every masked reply the server reads, as the SecAgg+ workflow reads it.
    tensors_seen: list[int] = []
    to_fitres = compat.recorddict_to_fitres

    def spy(content: Any, keep_input: bool) -> Any:
        tensors_seen.append(sum(len(record) for record in content.array_records.values()))
        return to_fitres(content, keep_input)

    monkeypatch.setattr(compat, "recorddict_to_fitres", spy)
    # What the algorithm aggregates: per round, each client's update.
    from fedlora.flower.secagg import SecAggFlowerRun

    aggregated: list[dict[int, dict[str, torch.Tensor]]] = []
    run_clients = SecAggFlowerRun.run_clients

    def record(self: SecAggFlowerRun, *args: Any) -> Any:
        outcomes = run_clients(self, *args)
        aggregated.append({c: o.update.tensors for c, o in outcomes.items() if isinstance(o, ClientOutcome)})
        return outcomes

    monkeypatch.setattr(SecAggFlowerRun, "run_clients", record)
    secure = [
        (load_config(SMOKE, [*o, "privacy.secure_aggregation=true"]), tmp_path / f"secure_{n}")
        for n, o in SECAGG_RUNS.items()
    ]
    simulate(secure, parallel=2)
    # The server never held an individual tensor: each masked reply came with its tensor records emptied...
    assert len(tensors_seen) == 2 * 3 * len(SECAGG_RUNS) and set(tensors_seen) == {0}
    # ... and each round's clients all carry one update, the secure mean.
    assert len(aggregated) == 2 * len(SECAGG_RUNS)
    for updates in aggregated:
        first = updates[min(updates)]
        assert len(updates) == 3 and all(torch.equal(u[k], first[k]) for u in updates.values() for k in first)
    for name, o in SECAGG_RUNS.items():
        plain_dir = tmp_path / f"plain_{name}"
        assert main(["run", str(SMOKE), "--out", str(plain_dir), "--quiet", *[a for x in o for a in ("--set", x)]]) == 0
        plain, masked = run_rows(plain_dir), run_rows(tmp_path / f"secure_{name}")
        # Quantization moves each weighted parameter by < 16 / 2**22 (4e-6): metrics move by about that.
        assert_close_rows(plain, masked, 1e-4, name)


def test_secure_aggregation_refuses_what_needs_individual_updates() -> None:
    from fedlora.errors import FedLoraError
    from fedlora.flower.secagg import NEEDS_INDIVIDUAL_UPDATES, SECURE_AGGREGATION_METHODS, secure_aggregation_problem

    def problem(*overrides: str) -> str | None:
        return secure_aggregation_problem(load_config(SMOKE, ["privacy.secure_aggregation=true", *overrides]))

    # Every registered method is either run or refused with its reason.
    assert set(registry()) <= SECURE_AGGREGATION_METHODS | set(NEEDS_INDIVIDUAL_UPDATES)
    assert problem() is None and problem("algorithm.name='ffa'") is None
    assert "client tree" in str(problem("algorithm.name='fedtreelora'"))
    assert "truncation" in str(problem("algorithm.name='fedhl'"))
    assert "privacy.mode = 'local'" in str(problem("privacy.mode='central'", "algorithm.weighting='uniform'"))
    assert "clip_update_norm = 0" in str(problem("federation.clip_update_norm=3.0"))
    from fedlora.simulation import Simulation

    with pytest.raises(FedLoraError, match="runs on Flower"):
        Simulation(load_config(SMOKE, ["privacy.secure_aggregation=true"]), Path("/nonexistent/never"))
