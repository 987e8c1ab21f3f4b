"""fedprox (a client hook) and the server optimizers over FedIT's update, on hand-made numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options
from fedlora.algorithms.fedprox import ProximalTerm
from fedlora.cli import main
from fedlora.errors import FedLoraError
from helpers import make_ctx, run_rows

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def build(name: str, ctx: Any, **options: Any) -> Any:
    cls = get_algorithm(name)
    return cls(ctx, parse_options(cls, options))


def test_the_proximal_term_and_its_gradient() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    head = torch.tensor([5.0], requires_grad=True)
    received = {"layers.0.query.lora.A": torch.tensor([0.0, 0.0]), "head.bias": torch.tensor([0.0])}
    term = ProximalTerm({"mu": 0.5}).extra_loss({"layers.0.query.lora.A": w, "head.bias": head}, received)
    assert term is not None
    assert float(term.detach()) == pytest.approx(0.25 * (1 + 4))  # mu/2 ||w - w0||^2; the head is not a LoRA factor
    term.backward()
    assert_close(w.grad, torch.tensor([0.5, 1.0]))  # mu (w - w0)
    assert ProximalTerm({"mu": 0.0}).extra_loss({"x": w}, {"x": w}) is None
    with pytest.raises(FedLoraError, match="mu"):
        build("fedprox", make_ctx({0: 1}), mu=-1.0)


def test_fedprox_with_mu_zero_is_fedit_and_mu_changes_the_run(tmp_path: Path) -> None:
    def run(name: str, *sets: str) -> list[dict[str, Any]]:
        out = tmp_path / name
        args = ["run", SMOKE, "--out", str(out), "--quiet", "--set", "train.lr=0.05", "--set", "train.local_steps=4"]
        assert main(args + [x for s in sets for x in ("--set", s)]) == 0
        return run_rows(out)

    fedit = run("fedit")
    assert run("mu0", "algorithm.name='fedprox'", "algorithm.mu=0.0") == fedit
    strong = run("mu", "algorithm.name='fedprox'", "algorithm.mu=100.0")
    assert strong != fedit
    # Same bytes: the proximal term costs nothing on the wire.
    assert [(r["bytes_up"], r["bytes_down"]) for r in strong] == [(r["bytes_up"], r["bytes_down"]) for r in fedit]


Q = "layers.0.query.lora"


def _two_rounds(name: str, **options: Any) -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Round 0: the clients upload x0 + 1 and x0 + 3 (weights 1:3, so delta = 2.5); round 1:
    both upload x1 - 2 (delta = -2). Returns the algorithm, x0 and [x1, x2]."""
    algo = build(name, make_ctx({0: 1, 1: 3}), **options)
    x0 = {k: v.clone() for k, v in algo.configure(0, [0])[0].tensors.items()}
    first = {0: Update({k: v + 1 for k, v in x0.items()}, 1), 1: Update({k: v + 3 for k, v in x0.items()}, 3)}
    algo.aggregate(0, first)
    x1 = {k: v.clone() for k, v in algo.configure(1, [0])[0].tensors.items()}
    algo.aggregate(1, {c: Update({k: v - 2 for k, v in x1.items()}, n) for c, n in ((0, 1), (1, 3))})
    x2 = {k: v.clone() for k, v in algo.configure(2, [0])[0].tensors.items()}
    return algo, x0, [x1, x2]


@pytest.mark.parametrize(
    ("name", "step1", "step2"),
    [
        # m1 = 2.5, x1 = x0 + 2.5; m2 = 0.9 * 2.5 - 2 = 0.25, x2 = x1 + 0.25
        ("fedavgm", 2.5, 0.25),
        # m1 = 0.25, v1 = 0.0625; m2 = 0.025, v2 = 0.99 * 0.0625 + 0.01 * 4 = 0.101875
        ("fedadam", 0.01 * 0.25 / (0.25 + 1e-3), 0.01 * 0.025 / (math.sqrt(0.101875) + 1e-3)),
        # v1 = 0 - 0.01 * 6.25 * sign(0 - 6.25) = 0.0625; v2 = 0.0625 - 0.01 * 4 * sign(0.0625 - 4) = 0.1025
        ("fedyogi", 0.01 * 0.25 / (0.25 + 1e-3), 0.01 * 0.025 / (math.sqrt(0.1025) + 1e-3)),
        # beta1 = 0: m = delta; v1 = 6.25, v2 = 10.25
        ("fedadagrad", 0.01 * 2.5 / (2.5 + 1e-3), 0.01 * -2 / (math.sqrt(10.25) + 1e-3)),
    ],
)
def test_server_optimizer_steps_by_hand(name: str, step1: float, step2: float) -> None:
    _, x0, (x1, x2) = _two_rounds(name)
    for key in x0:
        assert_close(x1[key], x0[key] + step1, rtol=1e-6, atol=1e-6)
        assert_close(x2[key], x1[key] + step2, rtol=1e-6, atol=1e-6)


def test_fedavgm_without_momentum_is_fedit() -> None:
    _, _, ours = _two_rounds("fedavgm", beta1=0.0)
    _, _, fedit = _two_rounds("fedit")
    for a, b in zip(ours, fedit, strict=True):
        for key in a:
            assert_close(a[key], b[key])


def test_server_optimizer_state_survives_a_checkpoint() -> None:
    algo, _, (x1, _) = _two_rounds("fedadam")
    tensors, meta = algo.state_dict()
    copy = build("fedadam", make_ctx({0: 1, 1: 3}))
    copy.load_state_dict(tensors, meta)
    updates = {c: Update({k: torch.ones_like(v) for k, v in x1.items()}, n) for c, n in ((0, 1), (1, 3))}
    algo.aggregate(2, updates)
    copy.aggregate(2, updates)
    for key, value in algo.configure(3, [0])[0].tensors.items():
        assert torch.equal(copy.configure(3, [0])[0].tensors[key], value)
    with pytest.raises(FedLoraError, match="beta2"):
        build("fedyogi", make_ctx({0: 1}), beta2=1.0)


def test_scaffold_client_correction_and_control_update_by_hand() -> None:
    from fedlora.algorithms.scaffold import ControlVariates

    c, ci = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    hooks = ControlVariates({}, tensors={"k": c}, state={"k": ci})
    w = torch.tensor([3.0, -1.0], requires_grad=True)
    term = hooks.extra_loss({"k": w}, {"k": torch.zeros(2)})
    assert term is not None
    term.backward()
    assert_close(w.grad, torch.tensor([0.5, 1.5]))  # the corrected gradient adds c - c_i
    # K = 2 steps at lr 0.1 from x = 0 to y = (-0.2, 0.4): (x - y) / (K lr) = (1, -2);
    # c_i+ = c_i - c + (1, -2) = (0.5, -3.5); the upload is c_i+ - c_i = (0, -4).
    up, state = hooks.finish({"k": torch.tensor([-0.2, 0.4])}, {"k": torch.zeros(2)}, 2, 0.1)
    assert_close(state["k"], torch.tensor([0.5, -3.5]))
    assert_close(up["k"], torch.tensor([0.0, -4.0]))
    # A client's first round: c_i = 0.
    first, _ = ControlVariates({}, tensors={"k": c}).finish({"k": torch.zeros(2)}, {"k": torch.zeros(2)}, 1, 1.0)
    assert_close(first["k"], -c)


def test_scaffold_server_averages_x_and_moves_c_by_the_participating_share() -> None:
    algo = build("scaffold", make_ctx({0: 1, 1: 3, 2: 4}))
    x0 = algo.configure(0, [0])[0].tensors
    assert all(torch.equal(v, torch.zeros_like(v)) for v in algo.configure(0, [0])[0].hook_tensors.values())

    def update(n: int, up: float, dc: float) -> Update:
        return Update(
            {k: v + up for k, v in x0.items()}, n, hook_tensors={k: torch.full_like(v, dc) for k, v in x0.items()}
        )

    updates = {0: update(1, 1.0, 2.0), 1: update(3, 3.0, 4.0)}
    algo.aggregate(0, updates)
    payload = algo.configure(1, [2])[2]
    for key, value in x0.items():
        assert_close(payload.tensors[key], value + 2.5)  # FedIT's weighted mean, weights 1:3
        assert_close(payload.hook_tensors[key], torch.full_like(value, 2.0))  # 0 + 2/3 * mean(2, 4)


def test_scaffold_runs_end_to_end_with_its_control_variates_counted_and_private(tmp_path: Path) -> None:
    from fedlora.store import ClientStore

    def run(name: str) -> tuple[Path, list[dict[str, Any]]]:
        out = tmp_path / name
        sets = ["train.lr=0.05", f"algorithm.name='{name}'", "run.rounds=2"]
        assert main(["run", SMOKE, "--out", str(out), "--quiet"] + [x for s in sets for x in ("--set", s)]) == 0
        return out, [r for r in run_rows(out) if r["client"] is not None]

    out, rows = run("scaffold")
    _, fedit = run("fedit")
    # c goes down and delta c_i up beside the LoRA: twice FedIT's bytes both ways.
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(2 * r["bytes_up"], 2 * r["bytes_down"]) for r in fedit]
    assert rows[0]["acc"] != fedit[0]["acc"] or rows[-1]["loss"] != fedit[-1]["loss"]
    store = ClientStore(out / "clients")
    store.load_index((sorted((out / "checkpoints").iterdir())[-1] / "clients.json").read_bytes())
    private = store.get(0)
    assert private and all(k.startswith("hook/layers.") for k in private)  # c_i stays on the client
