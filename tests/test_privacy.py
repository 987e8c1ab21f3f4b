"""Differential privacy: clipping, noise, adaptive bound and accountant by hand; runs with and without it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.testing import assert_close

from fedlora.cli import main
from fedlora.config import PrivacyConfig, load_config
from fedlora.errors import FedLoraError
from fedlora.privacy import LocalNoise, PrivacyEngine, clip_change, epsilon, gaussian_noise, noise_multiplier_for
from helpers import run_rows

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")
UNIFORM = ["--set", "algorithm.weighting='uniform'"]


def engine(num_clients: int = 4, per_round: int = 4, rounds: int = 3, **privacy: Any) -> PrivacyEngine:
    return PrivacyEngine(PrivacyConfig(**privacy), num_clients, per_round, rounds, 0)


# --- clipping ---------------------------------------------------------------------------
def test_clipping_bounds_the_change_over_all_tensors_together() -> None:
    reference = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0]])}
    update = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[2.0]])}
    # change = ([0, 2], [[2]]): norm sqrt(8); bound 1 scales it by 1 / sqrt(8).
    clipped, norm = clip_change(update, reference, 1.0)
    assert norm == pytest.approx(math.sqrt(8))
    s = 1 / math.sqrt(8)
    assert_close(clipped["a"], torch.tensor([1.0, 2 * s]))
    assert_close(clipped["b"], torch.tensor([[2 * s]]))
    # Within the bound: the very same tensors (no float round trip through reference + change).
    same, norm = clip_change(update, reference, 3.0)
    assert norm == pytest.approx(math.sqrt(8))
    assert all(same[k] is update[k] for k in update)


def test_central_mode_clips_each_client_and_counts_the_clipped() -> None:
    eng = engine(mode="central", clip_norm=1.0)
    reference = {"x": torch.zeros(2)}
    uploads = {0: {"x": torch.tensor([3.0, 4.0])}, 1: {"x": torch.tensor([0.3, 0.4])}}
    out, record = eng.process(0, uploads, {0: reference, 1: reference})
    assert_close(out[0]["x"], torch.tensor([0.6, 0.8]))
    assert out[1]["x"] is uploads[1]["x"]
    assert record.clipped == 1 and record.epsilon is None  # no noise: no finite guarantee


# --- noise ------------------------------------------------------------------------------
def test_central_noise_on_a_zero_update_sums_to_sigma_times_c() -> None:
    # Four clients upload exactly what they received; the noise of the sum has std sigma * C.
    sigma, c, n = 1.5, 0.2, 4
    eng = engine(mode="central", clip_norm=c, noise_multiplier=sigma)
    reference = {"x": torch.zeros(50_000, dtype=torch.float64)}
    uploads = {k: {"x": reference["x"].clone()} for k in range(n)}
    out, _ = eng.process(0, uploads, dict.fromkeys(range(n), reference))
    per_client = torch.stack([out[k]["x"] for k in range(n)])
    total = per_client.sum(0)
    assert abs(float(total.mean())) < 4 * sigma * c / math.sqrt(50_000)
    assert float(total.std()) == pytest.approx(sigma * c, rel=0.02)
    # Each client's share is N(0, (sigma C)^2 / n), independent across clients.
    assert float(per_client[0].std()) == pytest.approx(sigma * c / math.sqrt(n), rel=0.02)
    assert abs(float(torch.corrcoef(per_client[:2])[0, 1])) < 0.02


def test_local_noise_on_a_zero_update_has_std_sigma_times_c() -> None:
    sigma, c = 0.5, 2.0
    noise_of = LocalNoise(clip_norm=c, noise_multiplier=sigma, seed=0)
    received = {"layers.0.query.lora.A": torch.randn(8, 200), "layers.0.query.lora.B": torch.randn(300, 8)}
    head = {"head.bias": torch.zeros(2)}
    up, head_up = noise_of.apply(2, 1, {k: v.clone() for k, v in received.items()}, dict(head), {**received, **head})
    noise = torch.cat([(up[k] - received[k]).flatten() for k in received])
    assert set(head_up) == {"head.bias"}  # the head is noised with the adapters
    assert abs(float(noise.mean())) < 4 * sigma * c / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(sigma * c, rel=0.03)
    # Drawn from (seed, round, client): the same call gives the same noise, another client other noise.
    again, _ = noise_of.apply(2, 1, {k: v.clone() for k, v in received.items()}, dict(head), {**received, **head})
    other, _ = noise_of.apply(2, 2, {k: v.clone() for k, v in received.items()}, dict(head), {**received, **head})
    assert all(torch.equal(up[k], again[k]) for k in up)
    assert not torch.equal(up["layers.0.query.lora.A"], other["layers.0.query.lora.A"])


def test_local_clipping_bounds_the_change_from_the_start_state() -> None:
    start = {"a": torch.tensor([1.0, 1.0]), "head.bias": torch.tensor([0.0])}
    up, head = LocalNoise(clip_norm=1.0, noise_multiplier=0.0, seed=0).apply(
        0, 0, {"a": torch.tensor([4.0, 5.0])}, {"head.bias": torch.tensor([0.0])}, start
    )
    # change (3, 4, 0): norm 5, scaled to 1.
    assert_close(up["a"], torch.tensor([1.6, 1.8]))
    assert_close(head["head.bias"], torch.tensor([0.0]))


def test_hook_uploads_are_refused_under_privacy() -> None:
    eng = engine(mode="central", clip_norm=1.0)
    ref = {"x": torch.zeros(1)}
    with pytest.raises(FedLoraError, match="control variates"):
        eng.process(0, {0: {"x": torch.zeros(1)}}, {0: ref}, {0: {"c": torch.zeros(1)}})


def test_zero_std_noise_is_the_identity() -> None:
    x = {"x": torch.randn(3)}
    assert gaussian_noise(x, 0.0, 7)["x"] is x["x"]


# --- adaptive clipping --------------------------------------------------------------------
def test_adaptive_clip_follows_the_quantile_rule_by_hand() -> None:
    # Norms 1, 2, 3, 4 at C = 1.5: one unclipped of four, b = 0.25, target 0.5, lr 0.2:
    # C <- 1.5 * exp(-0.2 * (0.25 - 0.5)) = 1.5 * exp(0.05). No noise: the count is exact.
    eng = engine(mode="central", clip_norm=1.5, adaptive_clip=True, target_quantile=0.5, clip_lr=0.2)
    reference = {"x": torch.zeros(1)}
    uploads = {k: {"x": torch.tensor([float(k + 1)])} for k in range(4)}
    _, record = eng.process(0, uploads, dict.fromkeys(range(4), reference))
    assert record.clip_norm == 1.5 and record.clipped == 3
    assert eng.clip_norm == pytest.approx(1.5 * math.exp(0.05))
    # At C = 2.5 half are unclipped: b equals the target and C stays.
    eng.clip_norm = 2.5
    eng.process(1, uploads, dict.fromkeys(range(4), reference))
    assert eng.clip_norm == pytest.approx(2.5)


def test_adaptive_clip_splits_the_noise_between_count_and_updates() -> None:
    # Andrew et al.: z_updates = (z^-2 - (2 sigma_b)^-2)^-1/2; with z = 1, sigma_b = 2: (1 - 1/16)^-1/2.
    eng = engine(mode="central", noise_multiplier=1.0, adaptive_clip=True, clipped_count_stddev=2.0)
    assert eng.update_noise_multiplier == pytest.approx((1 - 1 / 16) ** -0.5)
    # Default sigma_b = clients per round / 20 = 0.2 < z / 2: refused with what to set.
    with pytest.raises(FedLoraError, match=r"clipped_count_stddev > 0\.5"):
        _ = engine(mode="central", noise_multiplier=1.0, adaptive_clip=True).update_noise_multiplier


# --- accountant ---------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 0.3, 10), (0.8, 1.0, 5), (2.0, 0.05, 200)])
def test_epsilon_equals_the_library_stepping_round_by_round(sigma: float, q: float, rounds: int) -> None:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(sigma, q, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_engine_reports_epsilon_after_every_round_with_the_sampling_rate() -> None:
    eng = engine(num_clients=10, per_round=3, mode="central", clip_norm=1.0, noise_multiplier=1.0)
    reference = {"x": torch.zeros(1)}
    for rnd in range(4):
        _, record = eng.process(rnd, {0: {"x": torch.zeros(1)}}, {0: reference})
        assert record.epsilon == pytest.approx(epsilon(1.0, 0.3, rnd + 1, 1e-5))
    summary = eng.summary("fedit")
    assert summary["sample_rate"] == pytest.approx(0.3) and summary["guarantee"].startswith("central")
    assert eng.summary("fedtreelora")["guarantee"].startswith("nominal")


def test_local_epsilon_is_the_most_taking_part_client_without_amplification() -> None:
    eng = engine(num_clients=4, per_round=2, mode="local", clip_norm=1.0, noise_multiplier=2.0)
    ref = {"x": torch.zeros(1)}
    for rnd, clients in enumerate([(0, 1), (0, 2), (0, 3)]):
        eng.process(rnd, {c: {"x": torch.zeros(1)} for c in clients}, dict.fromkeys(clients, ref))
    assert eng.participation == {0: 3, 1: 1, 2: 1, 3: 1}
    assert eng.epsilon() == pytest.approx(epsilon(2.0, 1.0, 3, 1e-5))


def test_target_epsilon_calibrates_sigma_to_just_reach_it() -> None:
    sigma = noise_multiplier_for(4.0, 0.5, 20, 1e-5)
    assert epsilon(sigma, 0.5, 20, 1e-5) <= 4.0
    assert epsilon(sigma, 0.5, 20, 1e-5) > 3.99
    eng = engine(num_clients=10, per_round=5, rounds=20, mode="central", target_epsilon=4.0)
    assert eng.noise_multiplier == pytest.approx(sigma)
    with pytest.raises(FedLoraError, match="cannot be reached"):
        noise_multiplier_for(1e-9, 1.0, 10_000, 1e-5)


# --- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["privacy.mode='global'"], "use 'off', 'central'"),
        (["privacy.mode='central'", "privacy.clip_norm=inf", "privacy.noise_multiplier=1.0"], "bounds nothing"),
        (["privacy.mode='central'", "privacy.target_epsilon=2.0", "privacy.noise_multiplier=1.0"], "not both"),
        (["privacy.target_epsilon=2.0"], "needs privacy.mode"),
        (["privacy.mode='local'", "privacy.adaptive_clip=true"], "never shows it"),
    ],
)
def test_bad_privacy_settings_say_what_to_do(override: list[str], message: str) -> None:
    with pytest.raises(FedLoraError, match=message):
        load_config(Path(SMOKE), override)


def test_central_dp_refuses_example_weights() -> None:
    @dataclass
    class Weighted:
        weighting: str = "examples"

    eng = engine(mode="central")
    with pytest.raises(FedLoraError, match=r"algorithm\.weighting = 'uniform'"):
        eng.check_weighting("fedit", Weighted())
    eng.check_weighting("fedit", Weighted("uniform"))
    engine(mode="local").check_weighting("fedit", Weighted())


# --- runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["central", "local"])
def test_no_noise_and_no_bound_equals_the_run_without_privacy(tmp_path: Path, mode: str) -> None:
    plain, private = tmp_path / "plain", tmp_path / "private"
    head = ["--set", "model.head='federated'"]
    assert main(["run", SMOKE, "--out", str(plain), "--quiet", *UNIFORM, *head]) == 0
    dp = ["--set", f"privacy.mode='{mode}'", "--set", "privacy.clip_norm=inf", "--set", "privacy.noise_multiplier=0.0"]
    assert main(["run", SMOKE, "--out", str(private), "--quiet", *UNIFORM, *head, *dp]) == 0
    dp_keys = {"dp_epsilon", "dp_delta", "dp_clip_norm", "dp_noise_multiplier", "dp_clipped"}
    got = [{k: v for k, v in r.items() if k not in dp_keys} for r in run_rows(private)]
    assert got == run_rows(plain)  # exact equality: bit-identical metrics
    assert all(r["dp_epsilon"] is None for r in run_rows(private) if r["client"] is None)


def test_central_dp_run_reports_its_budget_round_by_round(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    dp = [
        "privacy.mode='central'",
        "privacy.target_epsilon=8.0",
        "privacy.clip_norm=0.05",
        "federation.fraction=0.5",
        "run.rounds=3",
    ]
    args = ["run", SMOKE, "--out", str(out), "--quiet", *UNIFORM, *[a for o in dp for a in ("--set", o)]]
    assert main(args) == 0
    sigma = noise_multiplier_for(8.0, 0.5, 3, 1e-5)
    aggregates = [r for r in run_rows(out) if r["client"] is None]
    assert [r["dp_epsilon"] for r in aggregates] == pytest.approx([epsilon(sigma, 0.5, t, 1e-5) for t in (1, 2, 3)])
    assert aggregates[-1]["dp_epsilon"] <= 8.0
    assert all(r["dp_noise_multiplier"] == pytest.approx(sigma) for r in aggregates)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(aggregates[-1]["dp_epsilon"])
    assert summary["privacy"]["calibrated_to_target_epsilon"] == 8.0
    assert summary["final"]["dp_epsilon"] == aggregates[-1]["dp_epsilon"]


def test_adaptive_clip_resumes_bit_identically(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    dp = [
        "privacy.mode='central'",
        "privacy.adaptive_clip=true",
        "privacy.clip_norm=0.01",
        "privacy.noise_multiplier=0.5",
        "privacy.clipped_count_stddev=1.0",
        "run.rounds=3",
    ]
    common = [*UNIFORM, "--quiet", *[a for o in dp for a in ("--set", o)]]
    assert main(["run", SMOKE, "--out", str(straight), *common]) == 0
    assert main(["run", SMOKE, "--out", str(resumed), *common, "--set", "run.rounds=2"]) == 0
    assert main(["run", "--resume", str(resumed), *common]) == 0
    assert run_rows(straight) == run_rows(resumed)
    bounds = [r["dp_clip_norm"] for r in run_rows(straight) if r["client"] is None]
    assert bounds[0] == 0.01 and bounds[1] != bounds[0]
