"""fedtreelora: the client tree, the per-layer cuts, the experts (by hand), runs, resume, export."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options
from fedlora.algorithms.fedtreelora import (
    CutRule,
    Distances,
    FedTreeLoraOptions,
    block_permutations,
    build_tree,
    canonical_labels,
    choose_cluster_counts,
    cut_layer,
    layer_distances,
    plan_tree,
    silhouettes,
    tree_cuts,
)
from fedlora.cli import main
from fedlora.errors import FedLoraError
from fedlora.lora import LoraModel, ModuleId, init_state, num_bytes
from fedlora.metrics import read_metrics
from helpers import make_ctx, run_rows

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def views(points: np.ndarray) -> Distances:
    """Distances of ``(L, N, dim)`` points, one module per layer (the points are its B)."""
    return layer_distances([[torch.from_numpy(layer).float()] for layer in points])


def build(ctx, **options):  # type: ignore[no-untyped-def]
    cls = get_algorithm("fedtreelora")
    return cls(ctx, parse_options(cls, options))


def key(layer: int, slot: str, factor: str, module: str = "query") -> str:
    return f"layers.{layer}.{module}.{slot}.{factor}"


def upload(factors: dict[int, tuple[list[list[float]], list[list[float]]]]) -> dict[str, torch.Tensor]:
    """{layer: (A, B)} -> cluster-slot tensors of module query."""
    out = {}
    for layer, (a, b) in factors.items():
        out[key(layer, "cluster", "A")] = torch.tensor(a)
        out[key(layer, "cluster", "B")] = torch.tensor(b)
    return out


# --- 4 clients, 2 layers: every expert written down -------------------------------------------
# Module query, d_in = 1, d_out = 2, rank 1: A is 1x1, B is 2x1.
# Layer 0: every client has the same B -> all distances 0 -> silhouette 0 < tau: a root layer.
# Layer 1: B = (4, 0), (4, 2), (-4, 0), (-4, 2): pairs {0, 1} and {2, 3} at distance 2 inside,
#          about 8 apart -> 2 clusters.
SHAPES = {ModuleId(0, "query"): (2, 1), ModuleId(1, "query"): (2, 1)}
FOUR = {
    0: upload({0: ([[0.0]], [[1.0], [1.0]]), 1: ([[0.0]], [[4.0], [0.0]])}),
    1: upload({0: ([[1.0]], [[1.0], [1.0]]), 1: ([[10.0]], [[4.0], [2.0]])}),
    2: upload({0: ([[2.0]], [[1.0], [1.0]]), 1: ([[20.0]], [[-4.0], [0.0]])}),
    3: upload({0: ([[3.0]], [[1.0], [1.0]]), 1: ([[30.0]], [[-4.0], [2.0]])}),
}


def after_warmup(num_examples: dict[int, int], **options: Any):  # type: ignore[no-untyped-def]
    options.setdefault("cut", "threshold")
    algo = build(make_ctx(num_examples, SHAPES), warmup_rounds=1, **options)
    algo.aggregate(0, {c: Update(t, num_examples[c]) for c, t in FOUR.items()})
    return algo


def test_four_clients_two_layers_experts_by_hand() -> None:
    algo = after_warmup({0: 1, 1: 3, 2: 1, 3: 1})
    s = algo.structure()
    assert s["cluster_counts"] == [1, 2]
    assert s["partitions"] == [[[0, 1, 2, 3]], [[0, 1], [2, 3]]]
    payloads = algo.configure(1, [0, 3])
    p0, p3 = payloads[0].tensors, payloads[3].tensors
    # Layer 0 (root): uniform mean over all four; no external expert, no theta.
    assert_close(p0[key(0, "cluster", "A")], torch.tensor([[1.5]]))
    assert_close(p0[key(0, "cluster", "B")], torch.tensor([[1.0], [1.0]]))
    assert key(0, "external", "A") not in p0 and key(0, "mix", "theta") not in p0
    # Layer 1: client 0's cluster {0, 1}: A (0 + 10) / 2, B ((4, 0) + (4, 2)) / 2; external = {2, 3}.
    assert_close(p0[key(1, "cluster", "A")], torch.tensor([[5.0]]))
    assert_close(p0[key(1, "cluster", "B")], torch.tensor([[4.0], [1.0]]))
    assert_close(p0[key(1, "external", "A")], torch.tensor([[25.0]]))
    assert_close(p0[key(1, "external", "B")], torch.tensor([[-4.0], [1.0]]))
    # Client 3: the mirror image.
    assert_close(p3[key(1, "cluster", "A")], torch.tensor([[25.0]]))
    assert_close(p3[key(1, "external", "A")], torch.tensor([[5.0]]))
    # First post-warmup round: theta starts at logit(lambda_init) = 0, on the mixed layer only.
    assert_close(p0[key(1, "mix", "theta")], torch.tensor(0.0))
    layout = payloads[0].layout
    assert len(layout.modules[ModuleId(0, "query")].slots) == 1
    assert [s.name for s in layout.modules[ModuleId(1, "query")].slots] == ["cluster", "external"]
    # The client trains the cluster expert and theta; the external expert is frozen.
    assert layout.trainable_keys() == [
        key(0, "cluster", "A"),
        key(0, "cluster", "B"),
        key(1, "cluster", "A"),
        key(1, "cluster", "B"),
        key(1, "mix", "theta"),
    ]


def test_examples_weighting_and_lambda_init() -> None:
    # n = 1, 3, 1, 1: cluster {0, 1} A = (0 * 1 + 10 * 3) / 4 = 7.5, B = (4, (0 + 2 * 3) / 4) = (4, 1.5).
    algo = after_warmup({0: 1, 1: 3, 2: 1, 3: 1}, weighting="examples", lambda_init=0.8)
    p0 = algo.configure(1, [0])[0].tensors
    assert_close(p0[key(1, "cluster", "A")], torch.tensor([[7.5]]))
    assert_close(p0[key(1, "cluster", "B")], torch.tensor([[4.0], [1.5]]))
    # Layer 0 over all: A = (0 + 3 + 2 + 3) / 6 = 4 / 3.
    assert_close(p0[key(0, "cluster", "A")], torch.tensor([[4.0 / 3.0]]))
    assert_close(p0[key(1, "mix", "theta")], torch.tensor(math.log(0.8 / 0.2)))


def test_upload_is_the_cluster_expert_only_and_theta_stays_private() -> None:
    algo = after_warmup({0: 1, 1: 1, 2: 1, 3: 1})
    payload = algo.configure(1, [0])[0]
    trained = init_state(payload.layout, SHAPES, seed=0)
    trained = {k: v for k, v in trained.items() if k in set(payload.layout.trainable_keys())}
    up, private = payload.split(trained)
    assert set(private) == {key(1, "mix", "theta")}
    assert set(up) == {key(layer, "cluster", f) for layer in (0, 1) for f in ("A", "B")}
    fedit = get_algorithm("fedit")(make_ctx({0: 1}, SHAPES), parse_options(get_algorithm("fedit"), {}))
    assert num_bytes(up) == num_bytes(fedit.global_lora)
    # Once the client has trained theta, the server no longer sends it (the private one is used).
    algo.aggregate(1, {c: Update(t, 1) for c, t in FOUR.items()})
    assert key(1, "mix", "theta") not in algo.configure(2, [0])[0].tensors


def test_external_expert_gets_no_gradient_and_theta_does() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(1, 2)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([Layer(), Layer()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer[1].query(self.layer[0].query(x).sum(-1, keepdim=True))

    algo = after_warmup({0: 1, 1: 1, 2: 1, 3: 1})
    payload = algo.configure(1, [0])[0]
    model = LoraModel(Tiny(), ["query"], None)
    model.apply_layout(payload.layout)
    model.load({**init_state(payload.layout, SHAPES, 0), **payload.tensors})
    trainable = set(payload.layout.trainable_keys())
    for k, p in model.parameters_for(model.all_keys()):
        p.requires_grad_(k in trainable)
    model.model(torch.tensor([[1.0], [2.0]])).pow(2).sum().backward()
    params = dict(model.parameters_for(model.all_keys()))
    assert params[key(1, "external", "A")].grad is None
    assert params[key(1, "external", "B")].grad is None
    assert params[key(1, "mix", "theta")].grad is not None and float(params[key(1, "mix", "theta")].grad) != 0
    assert float(params[key(1, "cluster", "B")].grad.abs().sum()) > 0


# --- planted structure: 6 clients, 2 shallow layers alike, 2 deep layers in two groups ---------
def planted_b(client: int, layer: int) -> list[list[float]]:
    jitter = [0.0, 0.1, 0.05, 0.02, 0.08, 0.03][client]
    if layer < 2:
        return [[1.0 + jitter], [1.0 - jitter]]
    sign = 1.0 if client < 3 else -1.0
    return [[5.0 * sign + jitter], [jitter]]


def test_planted_structure_is_recovered() -> None:
    shapes = {ModuleId(layer, "query"): (2, 1) for layer in range(4)}
    algo = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, cut="threshold")
    updates = {c: Update(upload({layer: ([[0.0]], planted_b(c, layer)) for layer in range(4)}), 1) for c in range(6)}
    algo.aggregate(0, updates)
    s = algo.structure()
    assert s["cluster_counts"] == [1, 1, 2, 2]
    assert s["partitions"][3] == [[0, 1, 2], [3, 4, 5]]
    assert s["partitions"][0] == [[0, 1, 2, 3, 4, 5]]
    # Every layer records the score of each count it tried: tau (0.2) for one cluster, and in
    # the deep layers the two-group cut scores near 1 (within-group distances <= 0.14, between
    # groups about 10), so it wins; in the shallow layers only jitter separates the clients.
    scores = s["cut_scores"]
    assert [sorted(layer) for layer in scores] == [["1", "2", "3"], ["1", "2", "3"], ["1", "2", "3"], ["2", "3", "4"]]
    assert all(layer["1"] == 0.2 for layer in scores[:3])
    assert scores[2]["2"] > 0.95 and scores[3]["2"] > 0.95
    assert scores[0]["2"] < 0.2 and scores[1]["2"] < 0.2
    # The tree's last merge joins the two groups, far above every other merge.
    linkage = np.asarray(s["linkage"])
    assert linkage[-1, 2] > 4 * linkage[:-1, 2].max()
    # Ablations on the same clients.
    fixed = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, fixed_k=4, cut="threshold")
    fixed.aggregate(0, updates)
    assert fixed.structure()["cluster_counts"] == [4, 4, 4, 4]
    indep = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, independent_layers=True, cut="threshold")
    indep.aggregate(0, updates)
    assert indep.structure()["linkage"] is None and len(indep.structure()["layer_linkages"]) == 4
    assert indep.structure()["partitions"][3] == [[0, 1, 2], [3, 4, 5]]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 12),
    layers=st.integers(1, 6),
    window_k=st.integers(1, 4),
    tau=st.floats(-1.0, 1.0),
    cut=st.sampled_from(["calibrated", "threshold"]),
    planted=st.booleans(),
)
def test_counts_never_decrease_and_cuts_refine(
    seed: int, n: int, layers: int, window_k: int, tau: float, cut: str, planted: bool
) -> None:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(layers, n, 6)) + (np.arange(n) % 3)[None, :, None] * 3.0 * planted
    distances = views(points)
    options = FedTreeLoraOptions(window_k=window_k, tau=tau, cut=cut)
    tree = plan_tree(distances, list(range(n)), options, seed)
    counts = tree.counts
    assert all(1 <= c <= max(1, n - 1) for c in counts)
    assert all(0 <= b - a <= window_k - 1 for a, b in itertools.pairwise([1, *counts]))
    for layer, count in enumerate(counts):
        assert len(set(tree.labels[layer].tolist())) == count
    # Nested: clients together in a deeper layer are together in every shallower one.
    for shallow in range(layers):
        for deep in range(shallow + 1, layers):
            for i in range(n):
                for j in range(n):
                    if tree.labels[deep, i] == tree.labels[deep, j]:
                        assert tree.labels[shallow, i] == tree.labels[shallow, j]


def test_tau_above_every_silhouette_gives_root_layers_only() -> None:
    distances = views(np.random.default_rng(0).normal(size=(3, 5, 4)))
    tree = plan_tree(distances, range(5), FedTreeLoraOptions()).linkage
    counts, _, _ = choose_cluster_counts(tree, distances.full, 3, CutRule("threshold", tau=1.01))
    assert counts == [1, 1, 1]


# --- the calibrated cut -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 12), c=st.integers(2, 6))
def test_silhouettes_match_sklearn(seed: int, n: int, c: int) -> None:
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    c = min(c, n - 1)
    labels = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    rng.shuffle(labels)
    points = rng.normal(size=(n, 3))
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    ours = silhouettes(torch.from_numpy(distance), torch.from_numpy(labels)[None])
    theirs = silhouette_score(distance, labels, metric="precomputed")
    assert float(ours[0]) == pytest.approx(theirs, abs=1e-12)
    assert plain_silhouette(distance, labels) == pytest.approx(theirs, abs=1e-12)  # the reference below


def test_block_permutations_move_clients_within_their_block_only() -> None:
    blocks = np.array([0, 1, 0, 2, 1, 0, 2])
    perms = block_permutations(blocks, 200, np.random.default_rng(0))
    assert (blocks[perms] == blocks[None, :]).all()
    assert all(sorted(p) == list(range(7)) for p in perms.tolist())
    # Every client of block 0 (three of them) lands on client 0's seat about a third of the time.
    assert sorted(set(perms[:, 0].tolist())) == [0, 2, 5]
    assert np.bincount(perms[:, 0], minlength=6)[[0, 2, 5]].min() > 40


def plain_silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    """The silhouette by its definition in numpy (float64), cluster by cluster."""
    n = len(labels)
    clusters = sorted(set(labels.tolist()))
    sizes = np.array([(labels == k).sum() for k in clusters])
    sums = np.stack([distance[:, labels == k].sum(1) for k in clusters], axis=1)
    own = np.searchsorted(clusters, labels)
    a = sums[np.arange(n), own] / np.maximum(sizes[own] - 1, 1)
    others = sums / sizes
    others[np.arange(n), own] = np.inf
    b = others.min(1)
    scored = (sizes[own] > 1) & (np.maximum(a, b) > 0)
    return float(np.where(scored, (b - a) / np.where(scored, np.maximum(a, b), 1.0), 0.0).mean())


def full_test(
    distance: np.ndarray, cuts: dict[int, np.ndarray], c_prev: int, high: int, rule: CutRule, rng: np.random.Generator
) -> tuple[int, dict[int, float], dict[int, float]]:
    """The calibrated cut with all ``B`` relabellings scored, every silhouette by definition."""
    finer = [c for c in range(c_prev + 1, high + 1) if c >= 2]
    perms = block_permutations(cuts[c_prev], rule.permutations, rng)
    scores = {c: plain_silhouette(distance, cuts[c]) for c in range(max(c_prev, 2), high + 1)}
    p_values = {}
    for c in finer:
        null = [plain_silhouette(distance, cuts[c][perm]) for perm in perms]
        p_values[c] = (1 + sum(s >= scores[c] - 1e-6 for s in null)) / (rule.permutations + 1)
    eligible = [c for c in finer if p_values[c] <= rule.alpha / len(finer)]
    return (max(eligible, key=lambda c: (scores[c], -c)) if eligible else c_prev), scores, p_values


def test_sequential_test_decides_as_the_full_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 federations of 40 clients, planted (two or four groups) or exchangeable noise, each
    # tested from c_prev = 1 and from c_prev = 2 against a plain full test (all 99
    # relabellings, silhouettes by definition): the same count, the same scores, the same
    # p-values for the counts tested to the end, every count stopped early above the level
    # in the full test too, and the same random numbers drawn.
    from fedlora.algorithms import fedtreelora

    scored: list[int] = []
    original = fedtreelora._CutScorer.silhouettes

    def counting(self: Any, orders: np.ndarray, counts: Any) -> dict[int, torch.Tensor]:
        scored.append(len(orders))
        return original(self, orders, counts)

    monkeypatch.setattr(fedtreelora._CutScorer, "silhouettes", counting)
    rule = CutRule("calibrated")
    early = passed = 0
    for seed in range(24):
        rng = np.random.default_rng(seed)
        groups = (1, 2, 4)[seed % 3]
        # Split-half, as plan_tree does: the tree of one look at the clients, tested on another.
        fit, test = rng.normal(size=(2, 40, 24)) + 3.0 * rng.normal(size=(groups, 24))[np.arange(40) % groups]
        cuts = tree_cuts(build_tree(np.linalg.norm(fit[:, None] - fit[None], axis=-1)), range(1, 7))
        distance = np.linalg.norm(test[:, None] - test[None], axis=-1)
        for c_prev in (1, 2):
            high = c_prev + 2
            full_rng, rng = np.random.default_rng(seed), np.random.default_rng(seed)
            expected = full_test(distance, cuts, c_prev, high, rule, full_rng)
            scored.clear()
            got = cut_layer(torch.from_numpy(distance), cuts, c_prev, high, rule, rng)
            assert rng.random() == full_rng.random()
            assert got.count == expected[0]
            assert got.scores == pytest.approx(expected[1], abs=1e-12)
            # A count that passes is tested to the end; one stopped early failed in both.
            for c, p in expected[2].items():
                assert got.p_values[c] == p or min(p, got.p_values[c]) > rule.alpha / 2
            assert sum(scored) <= rule.permutations
            early += sum(scored) < rule.permutations
            passed += any(p <= rule.alpha / 2 for p in expected[2].values())
    # Half of the 48 tests stopped early (all without a passing count); the other half had a
    # count that passes, so ran all 99 relabellings.
    assert early == 24 and passed == 24


def test_sequential_test_by_hand() -> None:
    # 16 clients in two groups, eight at 0 and eight at 100 on a line, one block (c_prev = 1).
    # The planted 2-cut: a silhouette of exactly 1, and no relabelling of 8 + 8 clients
    # reproduces it among the 99 (chance 2 / 12870 each), so the test runs to the end:
    # p = 1 / 100. The 2-cut that puts four of each group in each cluster: every client has
    # a = 400 / 7 (3 others at 0, 4 at 100) and b = 400 / 8, s = (50 - 57.14) / 57.14 =
    # -1/8, the least an 8 + 8 split of these clients scores; every relabelling is at least
    # as good, so the first 16 stop the test: p = max(16 / 16, 17 / 100) = 1.
    position = np.repeat([0.0, 100.0], 8)
    distance = torch.from_numpy(np.abs(position[:, None] - position[None, :]))
    rule = CutRule("calibrated")
    planted = {1: np.zeros(16, dtype=np.int64), 2: np.repeat([0, 1], 8)}
    found = cut_layer(distance, planted, 1, 2, rule, np.random.default_rng(0))
    assert found.count == 2 and found.scores == {2: 1.0} and found.p_values == {2: 0.01}
    mixed = {1: planted[1], 2: np.tile([0, 0, 0, 0, 1, 1, 1, 1], 2)}
    none = cut_layer(distance, mixed, 1, 2, rule, np.random.default_rng(0))
    assert none.count == 1 and none.scores[2] == pytest.approx(-1 / 8) and none.p_values == {2: 1.0}


def planted_points(
    rng: np.random.Generator, groups: int, size: int, dim: int, shallow: int
) -> tuple[np.ndarray, np.ndarray]:
    """Noise N(0, 1) in every layer; from layer ``shallow`` on, each of ``groups`` groups of
    ``size`` clients moves by its own center (N(0, 2^2) per coordinate)."""
    planted = rng.permutation(np.arange(groups * size) % groups)
    points = rng.normal(size=(shallow + 2, groups * size, dim))
    points[shallow:] += 2.0 * rng.normal(size=(groups, dim))[planted]
    return points, planted


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(2, 3),
    # From 7 per group: two groups of 5 are split only ~82% of the time at 99 relabellings
    # (exact p 2/252, but two or more of the 99 draws reproduce the partition; docs/algorithms.md).
    size=st.integers(7, 9),
    dim=st.integers(32, 128),
    shallow=st.integers(0, 2),
)
def test_calibrated_cut_separates_planted_groups(seed: int, groups: int, size: int, dim: int, shallow: int) -> None:
    points, planted = planted_points(np.random.default_rng(seed), groups, size, dim, shallow)
    tree = plan_tree(views(points), list(range(groups * size)), FedTreeLoraOptions(cut="calibrated"), seed)
    # The deepest layer splits at least into the groups and no cluster mixes two of them.
    assert tree.counts[-1] >= groups
    deepest = tree.labels[-1]
    assert all(len(set(planted[deepest == k].tolist())) == 1 for k in range(tree.counts[-1]))


def test_calibrated_cut_recovers_planted_groups_exactly() -> None:
    # 60 seeded federations (2 or 3 groups of 5-7 clients, 32-128 entries, 0-2 noise layers
    # above the structured ones): the deepest partition is exactly the planted groups in 57
    # of them. Of the three others, one layer split a group (a false split at p = 0.02),
    # and twice (two groups of 5) the 2-cut of the fit tree split off a single client
    # first, so the layer took 3 clusters: the two groups, one of them less a singleton.
    rng = np.random.default_rng(0)
    exact = 0
    for seed in range(60):
        groups, size, dim, shallow = 2 + seed % 2, 5 + seed % 3, int(rng.integers(32, 129)), seed % 3
        points, planted = planted_points(rng, groups, size, dim, shallow)
        tree = plan_tree(views(points), list(range(groups * size)), FedTreeLoraOptions(cut="calibrated"), seed)
        found = tree.labels[-1]
        exact += tree.counts[-1] == groups and all(len(set(found[planted == g].tolist())) == 1 for g in range(groups))
    assert exact == 57


def test_calibrated_cut_rarely_splits_exchangeable_noise() -> None:
    # 300 federations of 12 clients whose B factors are i.i.d. noise (16 entries), one layer
    # each: the calibrated cut splits 5 of them (1.7%; its level is cut_alpha = 0.05, split
    # over the two finer counts it tries, and ties count against a split); the threshold rule
    # at tau = 0.2 splits 35 (11.7%), a rate nobody chose. Four layers of independent noise:
    # 22 runs of 300 split somewhere (7.3%; threshold: 50, 16.7%).
    def split_rate(layers: int, cut: str) -> float:
        rng = np.random.default_rng(layers)
        splits = 0
        for seed in range(300):
            tree = plan_tree(views(rng.normal(size=(layers, 12, 16))), range(12), FedTreeLoraOptions(cut=cut), seed)
            splits += tree.counts[-1] > 1
        return splits / 300

    assert split_rate(1, "calibrated") == pytest.approx(5 / 300)
    assert split_rate(1, "threshold") == pytest.approx(35 / 300)
    assert split_rate(4, "calibrated") == pytest.approx(22 / 300)


def test_tau_above_silhouette_behaves_exactly_as_fedit() -> None:
    # warmup_mode fedit + every layer a root: the same aggregates as fedit, round after round.
    shapes = {ModuleId(0, "query"): (3, 2), ModuleId(1, "value"): (2, 3)}
    n = {0: 2, 1: 5, 2: 1}
    tree = build(
        make_ctx(n, shapes, rank=2),
        warmup_rounds=2,
        warmup_mode="fedit",
        cut="threshold",
        tau=1.5,
        weighting="examples",
    )
    fedit_cls = get_algorithm("fedit")
    fedit = fedit_cls(make_ctx(n, shapes, rank=2), parse_options(fedit_cls, {}))
    gen = torch.Generator().manual_seed(0)
    for rnd in range(5):
        ups = {}
        for c in n:
            ups[c] = {}
            for mid, (d_out, d_in) in shapes.items():
                ups[c][key(mid.layer, "lora", "A", mid.module)] = torch.randn(2, d_in, generator=gen)
                ups[c][key(mid.layer, "lora", "B", mid.module)] = torch.randn(d_out, 2, generator=gen)
        fedit.aggregate(rnd, {c: Update(t, n[c]) for c, t in ups.items()})
        renamed = {c: {k.replace(".lora.", ".cluster."): v for k, v in t.items()} for c, t in ups.items()}
        tree.aggregate(rnd, {c: Update(t, n[c]) for c, t in renamed.items()})
        payload = tree.configure(rnd + 1, [1])[1]
        assert all(len(ml.slots) == 1 for ml in payload.layout.modules.values())
        for k, v in fedit.global_payload().tensors.items():
            assert_close(payload.tensors[k.replace(".lora.", ".cluster.")], v, atol=1e-6, rtol=0)
    assert tree.structure()["cluster_counts"] == [1, 1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_rounds": 0}, "warmup_rounds"),
        ({"distance": "l1"}, "distance"),
        ({"linkage": "ward2"}, "linkage"),
        ({"cut": "gap"}, "cut"),
        ({"cut_alpha": 1.0}, "cut_alpha"),
        ({"cut_permutations": 0}, "cut_permutations"),
        ({"lambda_init": 1.0}, "lambda_init"),
        ({"lambda_lr": -0.1}, "lambda_lr"),
        ({"weighting": "size"}, "weighting"),
        ({"fixed_k": 2, "independent_layers": True}, "pick one"),
        ({"rebuild_fit": 1.0}, "rebuild_fit"),
        ({"fixed_k": 9}, "fixed_k"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FedLoraError, match=message):
        build(make_ctx({0: 1, 1: 1}), **options)


# --- end to end on tiny-bert ------------------------------------------------------------------


TREE = ["--set", "algorithm.name='fedtreelora'", "--set", "algorithm.warmup_rounds=1", "--quiet"]
THRESHOLD = ["--set", "algorithm.cut='threshold'"]


def test_run_structure_plots_bytes_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(out), *TREE, *THRESHOLD, "--set", "run.rounds=3", "--set", "algorithm.tau=-1.0"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    s = summary["structure"]
    assert len(s["linkage"]) == 3 and len(s["cluster_counts"]) == 2
    assert [sum(len(c) for c in layer) for layer in s["partitions"]] == [4, 4]
    # Lambdas: private, trained away from lambda_init = 0.5, one per client and module.
    assert set(s["lambdas"]) == {"0", "1", "2", "3"}
    assert all(v != 0.5 for lam in s["lambdas"].values() for v in lam.values())
    # Every client trains every round, so the last round's lambda summary covers exactly the
    # reported values; the warmup round (no tree yet, nothing mixed) reports none.
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["client"] is None]
    reported = [v for lam in s["lambdas"].values() for v in lam.values()]
    assert "lambda_mean" not in rows[0]
    assert rows[-1]["lambda_mean"] == pytest.approx(sum(reported) / len(reported))
    assert (rows[-1]["lambda_min"], rows[-1]["lambda_max"]) == (min(reported), max(reported))
    # Upload = fedit's (A and B of 4 modules, rank 4, 256 floats each) every round.
    assert summary["bytes_up_total"] == 3 * 4 * (4 * 256 * 4)
    for name in ("client_tree.png", "clusters_per_layer.png", "lambda.png"):
        (out / "plots" / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "plots" / "client_tree.png").stat().st_size > 1000
    assert (out / "plots" / "clusters_per_layer.png").stat().st_size > 1000
    assert (out / "plots" / "lambda.png").stat().st_size > 1000


@pytest.mark.parametrize("stop", [1, 2])
def test_resume_gives_identical_metrics(tmp_path: Path, stop: int) -> None:
    # stop = 1: right after warmup and the tree; stop = 2: one mixed round later.
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    common = [*TREE, *THRESHOLD, "--set", "algorithm.tau=-1.0", "--set", "run.rounds=4"]
    assert main(["run", SMOKE, "--out", str(straight), *common]) == 0
    assert main(["run", SMOKE, "--out", str(resumed), *common, "--set", f"run.rounds={stop}"]) == 0
    assert main(["run", "--resume", str(resumed), *common]) == 0
    assert run_rows(straight) == run_rows(resumed)
    s1 = json.loads((straight / "summary.json").read_text())["structure"]
    s2 = json.loads((resumed / "summary.json").read_text())["structure"]
    assert s1 == s2


@pytest.mark.parametrize(("tau", "rank"), [(-1.0, 8), (2.0, 4)])
def test_export_matches_peft_logits(tmp_path: Path, tau: float, rank: int) -> None:
    from test_export import _our_logits, _peft_logits

    run = tmp_path / "run"
    args = [
        "run",
        SMOKE,
        "--out",
        str(run),
        *TREE,
        *THRESHOLD,
        "--set",
        "train.lr=0.05",
        "--set",
        f"algorithm.tau={tau}",
    ]
    assert main(args) == 0
    adapter = tmp_path / "adapter"
    assert main(["export", str(run), "--client", "2", "--out", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    # Mixed layers export at rank 2r (cluster and external stacked), root layers at rank r.
    assert config["r"] == rank
    ours, batch, source, num_labels = _our_logits(run, 2)
    theirs = _peft_logits(source, num_labels, adapter, batch)
    assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_lambda_has_an_absolute_learning_rate() -> None:
    # theta's rate is lambda_lr whatever train.lr: the multiplier of train.lr is lambda_lr / lr.
    for lr in (1e-4, 3e-3):
        algo = build(make_ctx({0: 1, 1: 1}, lr=lr), lambda_lr=0.05)
        assert algo.lr_multipliers == {"*.mix.theta": pytest.approx(0.05 / lr)}
    # lambda_lr = 0: the old relative rate, lambda_lr_mult x train.lr.
    assert build(make_ctx({0: 1, 1: 1}), lambda_lr=0.0, lambda_lr_mult=7.0).lr_multipliers == {"*.mix.theta": 7.0}
    with pytest.raises(FedLoraError, match=r"train\.lr"):
        build(make_ctx({0: 1, 1: 1}, lr=0.0), lambda_lr=0.05)


# --- planted structure end to end: tiny-bert, two groups with opposite label meanings ----------
FILLERS = 1
FILLER = "the a of and to in is it that was for on are as with his they at be this from have or by".split()  # noqa: SIM905


def conflicting_groups_csv(path: Path, clients: int = 12, per_client: int = 40) -> Path:
    """Two-word texts: a filler word and a keyword, "apple" or "river". Clients
    0 .. clients/2 - 1 call "apple" negative, the others positive (and "river" the reverse)."""
    rng = np.random.default_rng(0)
    lines = ["text,label,client"]
    for c in range(clients):
        for _ in range(per_client):
            y = int(rng.integers(2))
            words = [str(w) for w in rng.choice(FILLER, FILLERS)]
            words.insert(int(rng.integers(FILLERS + 1)), ("apple", "river")[y])
            label = y if c < clients // 2 else 1 - y
            lines.append(f"{' '.join(words)},{('neg', 'pos')[label]},c{c:02d}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_planted_conflicting_groups_found_and_beat_fedit(tmp_path: Path) -> None:
    # 12 clients in two planted groups of 6 whose label meanings are opposite (30 training
    # examples each; 10 local steps of 8 at lr 0.005: with Adam, small noisy steps let the
    # consistent, group-specific directions of B dominate). fedtreelora at its default
    # options (threshold cut at tau 0.2, lambda_lr 0.05, 5 local warmup rounds): after warmup both
    # layers split into exactly the planted groups, and it ends at 100% personalized
    # accuracy against fedit's 79.2% (measured: +20.8 points; the assertion asks for +15).
    # fedit's one model cannot serve both meanings; its clients' 10 local steps recover
    # part of their own. The calibrated cut finds the same groups (p = 0.01 at layer 0).
    data = conflicting_groups_csv(tmp_path / "groups.csv")
    common = [
        *("--set", f"data.dataset='csv:{data}'", "--set", "data.partition='natural'"),
        *("--set", "data.num_clients=12", "--set", "data.test_fraction=0.25"),
        *("--set", "data.max_train_per_client=0", "--set", "data.max_test_per_client=0"),
        *("--set", "run.rounds=10", "--set", "train.lr=0.005", "--set", "train.local_steps=10"),
        *("--set", "train.batch_size=8", "--quiet"),
    ]
    finals = {}
    for name, extra in (("fedtreelora", []), ("fedit", []), ("calibrated", ["algorithm.cut='calibrated'"])):
        algorithm = "fedit" if name == "fedit" else "fedtreelora"
        sets = [x for e in [f"algorithm.name='{algorithm}'", *extra] for x in ("--set", e)]
        assert main(["run", SMOKE, "--out", str(tmp_path / name), *common, *sets]) == 0
        finals[name] = json.loads((tmp_path / name / "summary.json").read_text())
    calibrated = finals["calibrated"]["structure"]
    assert calibrated["partitions"] == [[list(range(6)), list(range(6, 12))]] * 2
    assert calibrated["cut_p_values"][0]["2"] <= 0.025
    s = finals["fedtreelora"]["structure"]
    assert s["built_round"] == 4
    assert s["partitions"] == [[list(range(6)), list(range(6, 12))]] * 2
    tree_acc = finals["fedtreelora"]["final"]["personalized_acc_mean"]
    fedit_acc = finals["fedit"]["final"]["personalized_acc_mean"]
    assert tree_acc == 1.0 and tree_acc - fedit_acc >= 0.15
    # The external expert is the other group's model: lambda moved up from 0.5 on average
    # (measured 0.756, from 0.21 to 0.92 over the 48 client-modules).
    lambdas = [v for per_client in s["lambdas"].values() for v in per_client.values()]
    assert len(lambdas) == 48 and np.mean(lambdas) > 0.7


# --- rebuilt on drift ---------------------------------------------------------------------------
def test_tree_is_rebuilt_when_the_clients_no_longer_fit_it(tmp_path: Path) -> None:
    from fedlora.report import draw_tree_history

    shapes = {ModuleId(0, "query"): (2, 1)}
    jitter = [0.0, 0.1, 0.05, 0.02, 0.08, 0.03]

    def uploads(groups: list[int]) -> dict[int, Update]:
        # Client c's B sits at (+5, 0) or (-5, 0) by its group, plus a small jitter.
        return {
            c: Update(upload({0: ([[0.0]], [[5.0 * (1 - 2 * g) + jitter[c]], [jitter[c]]])}), 1)
            for c, g in enumerate(groups)
        }

    algo = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, cut="threshold", rebuild_fit=0.8)
    algo.aggregate(0, uploads([0, 0, 0, 1, 1, 1]))
    assert algo.structure()["partitions"] == [[[0, 1, 2], [3, 4, 5]]]
    algo.aggregate(1, uploads([0, 0, 0, 1, 1, 1]))  # same groups: the tree still fits
    algo.aggregate(2, uploads([0, 0, 1, 0, 1, 1]))  # clients 2 and 3 swapped sides
    s = algo.structure()
    (r1, fit1), (r2, fit2) = s["tree_fit"]
    assert (r1, r2) == (1, 2) and fit1 > 0.99 and fit2 < 0.8
    assert [(e["round"], e["reason"]) for e in s["tree_history"]] == [(0, "warmup"), (2, "drift")]
    assert s["tree_history"][1]["fit"] == fit2
    assert s["partitions"] == [[[0, 1, 3], [2, 4, 5]]] and s["built_round"] == 2
    # The experts follow the new tree: client 3's cluster expert is the mean of 0, 1 and 3.
    b = algo.configure(3, [3])[3].tensors[key(0, "cluster", "B")]
    assert_close(b, torch.tensor([[5.0 + (0.0 + 0.1 + 0.02) / 3], [(0.0 + 0.1 + 0.02) / 3]]))
    # Without the bound (the default) the drift goes unnoticed.
    plain = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, cut="threshold")
    for rnd, groups in enumerate([[0, 0, 0, 1, 1, 1]] * 2 + [[0, 0, 1, 0, 1, 1]]):
        plain.aggregate(rnd, uploads(groups))
    assert plain.structure()["partitions"] == [[[0, 1, 2], [3, 4, 5]]] and plain.structure()["tree_fit"] == []
    # report.py draws the partitions over time from `structure`.
    out = draw_tree_history(s["tree_history"], s["tree_fit"], tmp_path / "tree_history.png")
    assert out.stat().st_size > 1000


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), method=st.sampled_from(["average", "complete", "single"]))
def test_tree_cuts_equal_scipy_cut_tree(seed: int, n: int, method: str) -> None:
    from scipy.cluster.hierarchy import cut_tree

    points = np.random.default_rng(seed).normal(size=(n, 3))  # no ties: scipy breaks them otherwise
    tree = build_tree(np.linalg.norm(points[:, None] - points[None], axis=-1), method)
    ours = tree_cuts(tree, range(1, n + 1))
    # scipy's cut_tree is compared up to N - 1 clusters (the most the algorithm asks for;
    # for n_clusters = N scipy 1.x returns one cluster), ours gives singletons at N.
    theirs = cut_tree(tree, n_clusters=list(range(1, n)))
    for c in range(1, n):
        assert ours[c].tolist() == canonical_labels(theirs[:, c - 1]).tolist()
    assert ours[n].tolist() == list(range(n))
