"""The client side of a round: a small context, never the federation; what the server learns
from the client (its example count), and what travels with the payload (lr multipliers)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fedlora.algorithms import Payload, Update, get_algorithm, parse_options
from fedlora.algorithms.base import ClientHooks, ReportLambdas, Tensors
from fedlora.client import ClientContext, ClientOutcome, client_round
from fedlora.config import load_config
from fedlora.metrics import client_lambdas
from fedlora.simulation import ClientFailure, Simulation, build_federation
from helpers import make_ctx

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def test_a_round_needs_only_the_clients_context() -> None:
    fed = build_federation(load_config(SMOKE))
    split = fed.splits[1]
    own = ClientContext(1, fed.runner, split.train[:8], split.test, "frozen", "received")
    payload = fed.algorithm.payloads(0, [1])[1]
    outcome = client_round(own, 0, payload, {}, fed.head.payload(), evaluate=True)
    # The count the server will weight by is the client's own.
    assert outcome.update.num_examples == 8 and outcome.row["n_train"] == 8
    assert outcome.result is None and outcome.received is not None and outcome.received.n == len(split.test)
    assert fed.client_context(1).train.tolist() == split.train.tolist()


class Reporting(Simulation):
    """Clients report example counts other than the partition's (as a node with its own data would)."""

    uploads: dict[int, Tensors]

    def run_clients(
        self, rnd: int, payloads: Mapping[int, Payload], head_payload: Tensors, evaluate: bool
    ) -> dict[int, ClientOutcome | ClientFailure]:
        results = super().run_clients(rnd, payloads, head_payload, evaluate)
        self.uploads = {}
        for cid, outcome in results.items():
            assert isinstance(outcome, ClientOutcome)
            outcome.update.num_examples = 10 * (cid + 1)
            self.uploads[cid] = outcome.update.tensors
        return results


def test_the_server_weights_by_the_counts_clients_report(tmp_path: Path) -> None:
    sim = Reporting(load_config(SMOKE, ["train.lr=0.05"]), tmp_path / "run")
    sim.run_round(0)
    counts = {c: 10 * (c + 1) for c in sim.fed.client_ids}
    assert sim.fed.ctx.num_examples == counts
    total = sum(counts.values())
    global_lora = sim.fed.algorithm.global_payload()
    assert global_lora is not None
    for key, value in global_lora.tensors.items():
        expected = sum(counts[c] / total * sim.uploads[c][key] for c in counts)
        assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_lr_multipliers_travel_with_the_payload() -> None:
    ctx = make_ctx({0: 5, 1: 5})
    cls = get_algorithm("fedtreelora")
    algorithm = cls(ctx, parse_options(cls, {"lambda_lr_mult": 7.0}))
    for payload in algorithm.payloads(0, [0, 1]).values():
        assert payload.lr_multipliers == dict(algorithm.lr_multipliers)
        assert 7.0 in payload.lr_multipliers.values()
    plain = get_algorithm("fedit")(ctx, parse_options(get_algorithm("fedit"), {}))
    assert all(p.lr_multipliers == {} for p in plain.payloads(0, [0, 1]).values())


def test_a_multiplier_scales_the_step_of_the_matching_tensors() -> None:
    """With AdamW and one step, a tensor's change is lr x mult x g / (|g| + eps): a multiplier
    of 3 on B triples B's first step (A does not move: its gradient is 0 while B = 0)."""
    fed = build_federation(load_config(SMOKE, ["train.local_steps=1", "train.lr=0.01"]))
    payload = fed.algorithm.payloads(0, [0])[0]
    ctx = fed.client_context(0)
    plain = client_round(ctx, 0, payload, {}, {}, evaluate=False)
    boosted = Payload(payload.layout, payload.tensors, lr_multipliers={"*.B": 3.0})
    fast = client_round(ctx, 0, boosted, {}, {}, evaluate=False)
    for key, start in payload.tensors.items():
        step, fast_step = plain.update.tensors[key] - start, fast.update.tensors[key] - start
        if key.endswith(".B"):
            assert step.abs().max() > 0
            assert_close(fast_step, 3.0 * step, rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(fast_step, step)


def test_report_lambdas_sends_sigmoid_theta_per_module() -> None:
    trained = {
        "layers.0.query.mix.theta": torch.tensor(0.0),
        "layers.1.value.mix.theta": torch.tensor(math.log(3.0)),
        "layers.1.value.cluster.A": torch.ones(2, 3),
    }
    report = ReportLambdas({}).report(trained)
    assert report == pytest.approx({"lambda/layers.0.query": 0.5, "lambda/layers.1.value": 0.75})
    assert client_lambdas({2: {**report, "train_loss": 1.0}}) == {
        "2": pytest.approx({"layers.0.query": 0.5, "layers.1.value": 0.75})
    }


class Pull(ClientHooks):
    """An extra loss that pulls every trained tensor to zero, hard."""

    def extra_loss(self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 1e6 * sum(((t - 0.0) ** 2).sum() for t in trained.values())  # type: ignore[return-value]


def test_an_extra_loss_hook_changes_what_is_minimised_not_the_reported_loss() -> None:
    fed = build_federation(load_config(SMOKE, ["train.local_steps=1", "train.lr=0.01"]))
    payload = fed.algorithm.payloads(0, [0])[0]
    ctx = fed.client_context(0)
    plain = client_round(ctx, 0, payload, {}, {}, evaluate=False)
    pulled = client_round(replace(ctx, hooks=Pull), 0, payload, {}, {}, evaluate=False)
    assert pulled.update.metrics["train_loss"] == plain.update.metrics["train_loss"]
    # Adam's first step is lr x sign(g): A (nonzero) moves toward 0 by lr; without the pull A stays (B = 0).
    for key, start in payload.tensors.items():
        if key.endswith(".A"):
            assert torch.equal(plain.update.tensors[key], start)
            assert_close(pulled.update.tensors[key], start - 0.01 * torch.sign(start), rtol=0, atol=1e-6)


def test_one_byte_accounting() -> None:
    from fedlora.lora import Layout
    from fedlora.traffic import bytes_down, bytes_up

    tensors = {"layers.0.query.lora.A": torch.zeros(2, 3)}  # 6 floats
    head = {"head.bias": torch.zeros(2)}
    assert bytes_down(Payload(Layout({}), tensors), head) == (6 + 2) * 4
    assert bytes_down(Payload(Layout({}), tensors, upload=()), head) == 6 * 4  # no upload: no head sent
    assert bytes_down(Payload(Layout({}), tensors, wire_bytes=10), head) == 10 + 2 * 4  # a model of the wire
    assert bytes_down(Payload(Layout({}), tensors, hook_tensors={"c": torch.zeros(3)}), {}) == (6 + 3) * 4
    assert bytes_up(Update(tensors, 1), head) == (6 + 2) * 4 and bytes_up(Update({}, 1), {}) == 0
    assert bytes_up(Update(tensors, 1, hook_tensors={"c": torch.zeros(3)}), {}) == (6 + 3) * 4
