"""fedprox (a client hook) and the server optimizers over FedIT's update, on hand-made numbers."""

from __future__ import annotations

import json
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
from helpers import make_ctx

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


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
    return rows


def test_fedprox_with_mu_zero_is_fedit_and_mu_changes_the_run(tmp_path: Path) -> None:
    def run(name: str, *sets: str) -> list[dict[str, Any]]:
        out = tmp_path / name
        args = ["run", SMOKE, "--out", str(out), "--quiet", "--set", "train.lr=0.05", "--set", "train.local_steps=4"]
        assert main(args + [x for s in sets for x in ("--set", s)]) == 0
        return _rows(out)

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
