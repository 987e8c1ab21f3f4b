"""Differential tests: our aggregation against the authors' published aggregation math.

Each reference below is the formula read from the authors' public code (see
/work/shared/REFERENCES.md and docs/algorithms.md, "Checked against the authors' code"),
transcribed as plain float64 math on the same random inputs, never copied code. Where we
differ on purpose the test pins the difference instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedlora.algorithms import Algorithm, Update, get_algorithm, parse_options
from fedlora.algorithms.lowrank import delta_key
from fedlora.lora import ModuleId
from helpers import make_ctx

#: One square and one non-square module, so a transposed residual cannot pass.
QUERY, VALUE = ModuleId(0, "query"), ModuleId(1, "value")
SHAPES = {QUERY: (6, 6), VALUE: (7, 5)}  # (d_out, d_in)
EXAMPLES = {0: 3, 1: 10, 2: 7}
ALPHA = 16.0


def build(name: str, ranks: dict[int, int], **options: object) -> Algorithm:
    rank = max(ranks.values())
    ctx = make_ctx(dict(EXAMPLES), shapes=dict(SHAPES), rank=rank, alpha=ALPHA, ranks=ranks)
    cls = get_algorithm(name)
    return cls(ctx, parse_options(cls, dict(options)))


def key(mid: ModuleId, factor: str, slot: str = "lora") -> str:
    return f"layers.{mid.layer}.{mid.module}.{slot}.{factor}"


def random_uploads(ranks: dict[int, int], seed: int = 0, factors: tuple[str, ...] = ("A", "B")) -> dict[int, Update]:
    """Random factors per client: ``A`` is ``r_k x d_in``, ``B`` is ``d_out x r_k``."""
    gen = torch.Generator().manual_seed(seed)
    uploads: dict[int, Update] = {}
    for c, r in ranks.items():
        tensors: dict[str, torch.Tensor] = {}
        for mid, (d_out, d_in) in SHAPES.items():
            if "A" in factors:
                tensors[key(mid, "A")] = torch.randn(r, d_in, generator=gen)
            if "B" in factors:
                tensors[key(mid, "B")] = torch.randn(d_out, r, generator=gen)
        uploads[c] = Update(tensors, EXAMPLES[c])
    return uploads


def example_weights(clients: list[int]) -> dict[int, float]:
    """p_k = n_k / sum n over the clients given."""
    total = sum(EXAMPLES[c] for c in clients)
    return {c: EXAMPLES[c] / total for c in clients}


def np_factors(update: Update, mid: ModuleId) -> tuple[np.ndarray, np.ndarray]:
    return update.tensors[key(mid, "A")].double().numpy(), update.tensors[key(mid, "B")].double().numpy()


def product(update: Update, mid: ModuleId) -> np.ndarray:
    a, b = np_factors(update, mid)
    return b @ a


def close(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert_close(ours.double(), torch.from_numpy(reference), rtol=1e-5, atol=1e-5)


# --- FLoRA: ATP-1010/FederatedLLM -------------------------------------------------------
def flora_reference(uploads: dict[int, Update], mid: ModuleId, scaling: float) -> np.ndarray:
    """A_s = [p_1 A_1; ...; p_N A_N], B_s = [B_1 ... B_N] (B unweighted); W += s_g B_s A_s."""
    clients = sorted(uploads)
    p = example_weights(clients)
    a_stack = np.concatenate([p[c] * np_factors(uploads[c], mid)[0] for c in clients], axis=0)
    b_stack = np.concatenate([np_factors(uploads[c], mid)[1] for c in clients], axis=1)
    return scaling * b_stack @ a_stack


def test_flora_stacking_equals_the_authors_merge_at_one_rank() -> None:
    ranks = {0: 4, 1: 4, 2: 4}
    algo = build("flora", ranks)
    uploads = random_uploads(ranks)
    algo.aggregate(0, uploads)
    for mid in SHAPES:
        close(algo.global_payload().tensors[delta_key(mid)], flora_reference(uploads, mid, ALPHA / 4))
    # a second round adds its stack to the merged base, as their W <- W + s B_s A_s
    second = random_uploads(ranks, seed=1)
    algo.aggregate(1, second)
    for mid in SHAPES:
        expected = flora_reference(uploads, mid, ALPHA / 4) + flora_reference(second, mid, ALPHA / 4)
        close(algo.global_payload().tensors[delta_key(mid)], expected)


def test_flora_mixed_ranks_scale_each_client_by_its_own_alpha_over_r() -> None:
    # Deliberate difference (docs/algorithms.md): the authors merge with one global
    # s_g = alpha / r; we weight each client's product by its own s_k = alpha / r_k, the
    # scaling it trained at. The two agree when every s_k equals s_g (their alpha = 2 r_k).
    ranks = {0: 2, 1: 4, 2: 8}
    algo = build("flora", ranks)
    uploads = random_uploads(ranks)
    algo.aggregate(0, uploads)
    p = example_weights(sorted(ranks))
    for mid in SHAPES:
        own = sum(p[c] * (ALPHA / r) * product(uploads[c], mid) for c, r in ranks.items())
        close(algo.global_payload().tensors[delta_key(mid)], own)
        assert not np.allclose(own, flora_reference(uploads, mid, ALPHA / 8))


# --- FedEx-LoRA: RaghavSinghal10/fedex-lora ----------------------------------------------
def fedex_reference(uploads: dict[int, Update], mid: ModuleId, scaling: float) -> tuple[np.ndarray, ...]:
    """Uniform means; residual R = mean_k(B_k A_k) - B_bar A_bar; W0 += s R."""
    pairs = [np_factors(uploads[c], mid) for c in sorted(uploads)]
    a_bar = np.mean([a for a, _ in pairs], axis=0)
    b_bar = np.mean([b for _, b in pairs], axis=0)
    mean_product = np.mean([b @ a for a, b in pairs], axis=0)
    return a_bar, b_bar, scaling * (mean_product - b_bar @ a_bar)


def test_fedex_with_uniform_weights_equals_the_authors_residual() -> None:
    ranks = {0: 3, 1: 3, 2: 3}
    algo = build("fedex", ranks, weighting="uniform")
    uploads = random_uploads(ranks)
    algo.aggregate(0, uploads)
    sent = algo.global_payload().tensors
    for mid, (d_out, d_in) in SHAPES.items():
        a_bar, b_bar, residual = fedex_reference(uploads, mid, ALPHA / 3)
        close(sent[key(mid, "A")], a_bar)
        close(sent[key(mid, "B")], b_bar)
        close(sent[key(mid, "dW", slot="base")], residual)
        assert sent[key(mid, "dW", slot="base")].shape == (d_out, d_in)
    # Their code adds the transpose of s R, right only for GPT-2's Conv1D (in, out) weights;
    # on the square module it is a different matrix (and cannot be added to the 7x5 one).
    _, _, residual = fedex_reference(uploads, QUERY, ALPHA / 3)
    assert not np.allclose(residual, residual.T)
    # and the folded model is the exact average of the products
    for mid in SHAPES:
        pairs = [np_factors(uploads[c], mid) for c in sorted(uploads)]
        exact = (ALPHA / 3) * np.mean([b @ a for a, b in pairs], axis=0)
        folded = sent[key(mid, "dW", slot="base")] + (ALPHA / 3) * sent[key(mid, "B")] @ sent[key(mid, "A")]
        close(folded, exact)


def test_fedex_default_weights_by_examples_unlike_the_authors() -> None:
    # Deliberate difference: our default weighting is by example counts (as every other
    # method here); weighting = "uniform" reproduces the authors' 1/K.
    ranks = {0: 3, 1: 3, 2: 3}
    algo = build("fedex", ranks)
    uploads = random_uploads(ranks)
    algo.aggregate(0, uploads)
    p = example_weights(sorted(ranks))
    a_weighted = sum(p[c] * np_factors(uploads[c], QUERY)[0] for c in ranks)
    close(algo.global_payload().tensors[key(QUERY, "A")], a_weighted)


# --- FlexLoRA: alibaba/FederatedScope (branch FlexLoRA) ----------------------------------
def test_flexlora_equals_the_authors_svd_redistribution() -> None:
    ranks = {0: 2, 1: 3, 2: 5}
    algo = build("flexlora", ranks)
    uploads = random_uploads(ranks)
    algo.aggregate(0, uploads)
    p = example_weights(sorted(ranks))
    payloads = algo.configure(1, sorted(ranks))
    for mid in SHAPES:
        # dW_g = sum_k p_k (alpha / r_k) B_k A_k
        dw_g = sum(p[c] * (ALPHA / r) * product(uploads[c], mid) for c, r in ranks.items())
        close(algo.global_payload().tensors[delta_key(mid)], dw_g)
        u, s, vt = np.linalg.svd(dw_g, full_matrices=False)
        for c, r in ranks.items():
            a = payloads[c].tensors[key(mid, "A")].double().numpy()
            b = payloads[c].tensors[key(mid, "B")].double().numpy()
            # A = V_r^T (orthonormal rows), B = U_r S_r / (alpha / r): all singular values in B
            close(torch.from_numpy(a @ a.T), np.eye(r))
            close(torch.from_numpy((ALPHA / r) * b @ a), u[:, :r] @ np.diag(s[:r]) @ vt[:r])
            close(torch.from_numpy(np.linalg.norm((ALPHA / r) * b, axis=0)), s[:r])


# --- FedSA-LoRA: Pengxin-Guo/FedSA-LoRA ---------------------------------------------------
def test_fedsa_averages_a_by_examples_and_keeps_b_local() -> None:
    ranks = {0: 4, 1: 4, 2: 4}
    algo = build("fedsa", ranks)
    payloads = algo.configure(0, sorted(ranks))
    assert all(p.upload == ("*.A",) for p in payloads.values())
    assert not any(k.endswith(".B") for p in payloads.values() for k in p.tensors)
    uploads = random_uploads(ranks, factors=("A",))
    algo.aggregate(0, uploads)
    p = example_weights(sorted(ranks))
    for mid in SHAPES:
        expected = sum(p[c] * uploads[c].tensors[key(mid, "A")].double().numpy() for c in ranks)
        close(algo.configure(1, [0])[0].tensors[key(mid, "A")], expected)


# --- Flower FedAvg: adap/flower -----------------------------------------------------------
def flower_weighted_mean(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """x_bar = sum_k (n_k / N) x_k: the sum of n_k x_k, then divided by N."""
    total = sum(n for _, n in results)
    return [sum(n * arrays[i] for arrays, n in results) / total for i in range(len(results[0][0]))]


@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_fedit_and_ffa_equal_flowers_fedavg(name: str) -> None:
    ranks = {0: 4, 1: 4, 2: 4}
    algo = build(name, ranks)
    factors = ("A", "B") if name == "fedit" else ("B",)
    uploads = random_uploads(ranks, factors=factors)
    algo.aggregate(0, uploads)
    keys = sorted(uploads[0].tensors)
    results = [([uploads[c].tensors[k].double().numpy() for k in keys], EXAMPLES[c]) for c in sorted(uploads)]
    glob = algo.global_payload().tensors
    for k, expected in zip(keys, flower_weighted_mean(results), strict=True):
        close(glob[k], expected)
    assert set(glob) == set(keys)


def test_flower_library_fedavg_agrees_with_the_transcription() -> None:
    aggregate: Callable[[list[tuple[list[np.ndarray], int]]], list[np.ndarray]]
    aggregate = pytest.importorskip("flwr.server.strategy.aggregate").aggregate
    ranks = {0: 4, 1: 4, 2: 4}
    uploads = random_uploads(ranks)
    keys = sorted(uploads[0].tensors)
    results = [([uploads[c].tensors[k].double().numpy() for k in keys], EXAMPLES[c]) for c in sorted(uploads)]
    for theirs, ours in zip(aggregate(results), flower_weighted_mean(results), strict=True):
        np.testing.assert_allclose(theirs, ours, rtol=1e-12)
