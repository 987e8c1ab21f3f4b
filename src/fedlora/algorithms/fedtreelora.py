"""fedtreelora: tree-structured, layer-wise personalized aggregation of LoRA.

Paper: "FedTreeLoRA" (arXiv 2603.13282, ICML 2026). Client similarity decides *how deep*
sharing goes: one agglomerative tree over the clients, cut at a depth of its own by every
layer, with cuts that never get coarser from shallow to deep layers.

1. **Warmup** (``warmup_rounds`` rounds): every client trains one LoRA from the shared
   seeded init, either locally (``warmup_mode = "local"``: the server only keeps each
   client's latest upload and sends it back to that client) or with FedIT averaging
   (``"fedit"``).
2. **Distances** from the uploaded **B** factors only: per layer ``D_l[i, j]`` = mean over
   the layer's modules of ``||B_i - B_j||_F`` (``distance = "frobenius"``) or of
   ``1 - cos(B_i, B_j)`` (``"cosine"``); the global distance ``D`` is the mean over layers.
   The same from the even and from the odd entries of the flattened B (``fit`` / ``test``).
3. **Tree**: scipy ``linkage`` of ``D`` (``linkage = "average" | "complete" | "single"``).
   ``P_c`` is the cut of the tree into exactly ``c`` clusters; cuts are nested.
4. **Cluster count per layer**, shallow to deep from ``c_prev = 1``: candidates
   ``c in [c_prev, min(N - 1, c_prev + K - 1)]``; counts never decrease with depth.
   ``cut = "calibrated"``: the counts are decided on a second tree built on the
   ``fit`` distances; a finer cut ``c > c_prev`` of it is eligible when its silhouette under
   the layer's ``test`` distances beats ``cut_permutations`` relabellings of the clients
   within the clusters of the coarser cut (p-value ``(1 + #{null >= observed}) / (B + 1)
   <= cut_alpha / m`` for the ``m`` finer counts tried; a sequential test that stops once a
   count cannot pass, with the full test's decisions: :func:`cut_layer`); the eligible cut
   with the best silhouette wins, else ``c_prev`` stays.
   Splitting the entries keeps the test honest: the partitions are chosen on numbers the
   test does not see. ``cut = "threshold"`` (the paper, default): ``score(1) = tau``,
   ``score(c >= 2)`` = silhouette of ``P_c`` under ``D_l``; ``c_l = argmax`` (the smallest
   on ties).
5. **Experts**: for client k at layer l with cluster S (in ``P_{c_l}``), the cluster
   expert is the factor-wise mean of the members' uploads over S and the external expert
   the mean over the other clients (``weighting = "uniform"`` as in the paper, or
   ``"examples"``). Root layers (``c_l = 1``) have no external expert and lambda = 1.
6. **Client model** per module: ``h = W0 x + lam s B_c A_c x + (1 - lam) s B_e A_e x``,
   ``lam = sigmoid(theta)`` per client and module; the client trains the cluster expert and
   ``theta`` (private, learning rate ``lambda_lr``, absolute: the client's optimizer runs
   ``theta`` at ``lambda_lr / train.lr`` times the LoRA rate), the external
   expert is frozen, and only the cluster expert is uploaded (fedit's upload size).
7. **Server, each round**: recompute every cluster and external expert from the clients'
   latest uploads (with full participation: this round's).

Keys: the cluster expert lives in slot ``cluster`` (``layers.3.value.cluster.A``), the
external expert in slot ``external`` and the mixing logit at ``layers.3.value.mix.theta``.

Options
-------
warmup_rounds : int, default 5
    Rounds of warmup before the tree is built (at least 1).
warmup_mode : "local" (default) or "fedit"
distance : "frobenius" (default) or "cosine"
linkage : "average" (default), "complete" or "single"
window_k : int, default 3
    K: how many cluster counts a layer may try, from the previous layer's count up.
cut : "threshold" (default, the paper) or "calibrated"
    How a layer decides to split (step 4). The calibrated rule did not win the pilots
    (docs/results.md), so the paper's rule stays the default.
tau : float, default 0.2
    Threshold rule: the score of not splitting (a layer splits only where some cut's
    silhouette beats it).
cut_alpha : float, default 0.05
    Calibrated rule: the test level of a split (the false-split rate of one layer's test).
cut_permutations : int, default 99
    Calibrated rule: relabellings per test (the smallest p-value is ``1 / (B + 1)``).
lambda_init : float, default 0.5
    Initial lambda (``theta0 = logit(lambda_init)``), in (0, 1).
lambda_lr : float, default 0.05
    Learning rate of ``theta``, whatever the LoRA rate (0 = ``lambda_lr_mult`` x ``train.lr``).
lambda_lr_mult : float, default 10.0
    Learning-rate multiplier of ``theta`` when ``lambda_lr = 0``.
weighting : "uniform" (default) or "examples"
    Weights of the expert means (uniform as in the paper, or by training examples).
rebuild_every : int, default 0
    Rebuild the tree and the cuts every R rounds from the latest uploads (0 = never).
rebuild_fit : float, default 0.0
    Rebuild them when the tree no longer fits the clients: after every round, the cophenetic
    correlation between the tree and the current global distances; below this bound, a
    rebuild (0 = never check).
fixed_k : int, default 0
    Ablation: cut the tree into this many clusters at every layer (0 = choose per layer).
independent_layers : bool, default False
    Ablation: cluster every layer on its own distances with its own tree, each starting
    from ``c_prev = 1`` (no shared tree, no monotonicity).
no_external : bool, default False
    Ablation: no external expert anywhere (lambda = 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import cophenet
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from fedlora.algorithms.base import (
    Algorithm,
    FederationContext,
    Options,
    Payload,
    ReportLambdas,
    Tensors,
    Update,
    register,
)
from fedlora.errors import FedLoraError
from fedlora.lora import MIX_SLOT, Layout, ModuleLayout, SlotSpec, init_state, make_key, parse_key

CLUSTER_SLOT = "cluster"
EXTERNAL_SLOT = "external"
DISTANCES = ("frobenius", "cosine")
LINKAGES = ("average", "complete", "single")
CUTS = ("calibrated", "threshold")


@dataclass
class FedTreeLoraOptions(Options):
    warmup_rounds: int = 5
    warmup_mode: str = "local"
    distance: str = "frobenius"
    linkage: str = "average"
    window_k: int = 3
    cut: str = "threshold"
    tau: float = 0.2
    cut_alpha: float = 0.05
    cut_permutations: int = 99
    lambda_init: float = 0.5
    lambda_lr: float = 0.05
    lambda_lr_mult: float = 10.0
    weighting: str = "uniform"
    rebuild_every: int = 0
    rebuild_fit: float = 0.0
    fixed_k: int = 0
    independent_layers: bool = False
    no_external: bool = False

    def __post_init__(self) -> None:
        choices = {
            "warmup_mode": ("local", "fedit"),
            "distance": DISTANCES,
            "linkage": LINKAGES,
            "cut": CUTS,
            "weighting": ("uniform", "examples"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise FedLoraError(f"algorithm.{name} = {value!r}: use one of {', '.join(map(repr, allowed))}")
        if self.warmup_rounds < 1:
            raise FedLoraError(
                f"algorithm.warmup_rounds = {self.warmup_rounds}: the tree is built from warmup LoRAs; use >= 1"
            )
        if self.window_k < 1:
            raise FedLoraError(f"algorithm.window_k = {self.window_k}: use >= 1")
        if not 0.0 < self.cut_alpha < 1.0:
            raise FedLoraError(f"algorithm.cut_alpha = {self.cut_alpha}: a test level; use a value in (0, 1)")
        if self.cut_permutations < 1:
            raise FedLoraError(f"algorithm.cut_permutations = {self.cut_permutations}: use >= 1 (99 gives p >= 0.01)")
        if not 0.0 < self.lambda_init < 1.0:
            raise FedLoraError(
                f"algorithm.lambda_init = {self.lambda_init}: lambda is a sigmoid; use a value in (0, 1)"
            )
        if self.lambda_lr < 0:
            raise FedLoraError(
                f"algorithm.lambda_lr = {self.lambda_lr}: use a learning rate > 0, or 0 for lambda_lr_mult x train.lr"
            )
        if self.lambda_lr_mult <= 0:
            raise FedLoraError(f"algorithm.lambda_lr_mult = {self.lambda_lr_mult}: use a positive multiplier")
        if self.rebuild_every < 0:
            raise FedLoraError(f"algorithm.rebuild_every = {self.rebuild_every}: use 0 (never) or a number of rounds")
        if not 0.0 <= self.rebuild_fit < 1.0:
            raise FedLoraError(
                f"algorithm.rebuild_fit = {self.rebuild_fit}: a cophenetic correlation bound in [0, 1) (0 = never)"
            )
        if self.fixed_k < 0:
            raise FedLoraError(f"algorithm.fixed_k = {self.fixed_k}: use 0 (choose per layer) or a cluster count")
        if self.fixed_k and self.independent_layers:
            raise FedLoraError("algorithm.fixed_k and algorithm.independent_layers are separate ablations; pick one")


# --- the client tree: pure functions over distance matrices ------------------------------
@dataclass
class Distances:
    """Per-layer client distances ``(L, N, N)`` (float32, zero diagonal).

    ``full`` uses the whole B factors (the tree the clients get is built on it); ``fit`` and
    ``test`` use the even and the odd entries of the flattened B factors, two independent
    looks at the same clients when their entries are independent noise. The calibrated cut
    picks its partitions on ``fit`` and tests them on ``test``, so the tree's search never
    sees the numbers it is judged on.
    """

    full: np.ndarray
    fit: np.ndarray
    test: np.ndarray


def layer_distances(b_factors: Sequence[Sequence[torch.Tensor]], metric: str = "frobenius") -> Distances:
    """Per-layer client distances from B factors.

    Parameters
    ----------
    b_factors
        ``b_factors[l][m]`` is a ``(N, ...)`` tensor: module ``m`` of layer ``l``'s B factor
        of every client (row ``i`` = client ``i``).
    metric
        ``"frobenius"``: ``||B_i - B_j||_F``; ``"cosine"``: ``1 - cos`` of the flattened B
        (a zero B has cosine 0 to every other B: distance 1).

    Returns
    -------
    Distances
        ``D_l`` = mean over the layer's modules, for the whole factors and for each half.

    Every module costs two float32 Gram matrices, of its even and of its odd entries (the
    whole factors' Gram is their sum), each numpy's ``x @ x.T``: BLAS ``syrk``, which
    computes one triangle and mirrors it (``N^2 D / 2`` multiply-adds in all; 9 ms against
    15.5 ms for torch's full product of 1,000 x 768 on one thread, CPU time). The
    Frobenius ones are of the clients' factors centred on their mean (exact in real
    arithmetic, and it keeps the float32 cancellation small).
    """
    if metric not in DISTANCES:
        raise FedLoraError(f"distance {metric!r}: use one of {', '.join(DISTANCES)}")
    n = b_factors[0][0].shape[0]
    out = np.zeros((3, len(b_factors), n, n), dtype=np.float32)
    grams = np.empty((2, n, n), dtype=np.float32)
    for layer, modules in enumerate(b_factors):
        full, fit, test = (torch.from_numpy(out[v, layer]) for v in range(3))
        weight = 1.0 / len(modules)
        for b in modules:
            x = b.detach().reshape(n, -1).float()
            centre = x.mean(0) if metric == "frobenius" else x.new_zeros(x.shape[1])
            for start, gram in enumerate(grams):
                half = torch.sub(x[:, start::2], centre[start::2]).numpy()
                np.matmul(half, half.T, out=gram)
            g_fit, g_test = torch.from_numpy(grams[0]), torch.from_numpy(grams[1])
            sq_fit, sq_test = g_fit.diagonal().clone(), g_test.diagonal().clone()
            if metric == "frobenius":
                d2_fit, d2_test = _squared_distances(g_fit, sq_fit), _squared_distances(g_test, sq_test)
                full.add_(torch.add(d2_fit, d2_test).sqrt_(), alpha=weight)
                fit.add_(d2_fit.sqrt_(), alpha=weight)
                test.add_(d2_test.sqrt_(), alpha=weight)
            else:
                full.add_(_cosine_distances(g_fit + g_test, sq_fit + sq_test), alpha=weight)
                fit.add_(_cosine_distances(g_fit, sq_fit), alpha=weight)
                test.add_(_cosine_distances(g_test, sq_test), alpha=weight)
        for view in (full, fit, test):
            view.fill_diagonal_(0.0)
    return Distances(out[0], out[1], out[2])


def _squared_distances(gram: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2`` from the Gram matrix, in place (clamped at 0 against rounding)."""
    return torch.add(sq_norms[:, None], gram, alpha=-2.0, out=gram).add_(sq_norms[None, :]).clamp_(min=0.0)


def _cosine_distances(gram: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    norms = sq_norms.sqrt().clamp_min(1e-12)
    return (1.0 - gram / norms[:, None] / norms[None, :]).clamp_min(0.0)


def build_tree(distance: np.ndarray, method: str = "average") -> np.ndarray:
    """Agglomerative tree (scipy linkage matrix, ``(N - 1) x 4``) of a client distance matrix."""
    return np.asarray(scipy_linkage(squareform(_clean(distance), checks=False), method=method))


def _clean(distance: np.ndarray) -> np.ndarray:
    """Symmetric with a zero diagonal (guards against rounding in the inputs)."""
    symmetric: np.ndarray = (distance + distance.T) / 2
    np.fill_diagonal(symmetric, 0.0)
    return symmetric


def tree_cuts(tree: np.ndarray, counts: Sequence[int]) -> dict[int, np.ndarray]:
    """Cuts of ``tree`` into exactly ``c`` clusters for each ``c`` in ``counts``.

    The cut into ``c`` clusters is what the first ``N - c`` merges of the linkage made (as
    scipy's ``cut_tree``, tested equal without ties, minus its per-cluster tree walks; at
    merges of equal height it follows the linkage's row order). Labels are
    canonical: clusters are numbered in order of their first client.
    """
    wanted = set(counts)
    n = tree.shape[0] + 1
    labels = np.arange(n)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    cuts: dict[int, np.ndarray] = {}
    for k in range(n):
        if n - k in wanted:
            cuts[n - k] = canonical_labels(labels)
        if k == n - 1:
            break
        merged = members.pop(int(tree[k, 0])) + members.pop(int(tree[k, 1]))
        labels[merged] = n + k
        members[n + k] = merged
    return cuts


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster labels 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


@dataclass(frozen=True)
class CutRule:
    """How a layer decides whether a finer cut of the tree is worth taking.

    ``"threshold"`` (the paper): score(1) = ``tau``, score(c >= 2) = silhouette; the best
    candidate wins. ``"calibrated"``: a finer cut ``c > c_prev`` is eligible only if its
    silhouette beats chance for the layer's own distances: ``permutations`` relabellings
    that move clients only *within* the clusters of ``P_{c_prev}`` (so the sizes and the
    coarser structure are kept), one-sided p-value ``(1 + #{null >= observed}) / (B + 1)``,
    eligible when ``p <= alpha / m`` for the ``m`` finer counts tried (Bonferroni: one
    layer splits exchangeable clients with probability at most ``alpha``); the eligible cut
    with the best silhouette wins, and without one the layer keeps ``c_prev``. The relabellings come from ``seed``.
    """

    kind: str = "calibrated"
    tau: float = 0.2
    alpha: float = 0.05
    permutations: int = 99
    seed: int = 0

    @staticmethod
    def from_options(options: FedTreeLoraOptions, seed: int = 0) -> CutRule:
        return CutRule(options.cut, options.tau, options.cut_alpha, options.cut_permutations, seed)


def silhouettes(distance: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean silhouette of every row of ``labels`` (``(P, N)``, clusters ``0 .. c - 1``, none empty).

    sklearn's definition with a precomputed ``distance`` (``N x N``): ``a`` = mean distance to
    the own cluster's other members, ``b`` = the smallest mean distance to another cluster,
    ``s = (b - a) / max(a, b)``; members of singleton clusters (and ``max(a, b) = 0``) score 0.
    """
    num = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, num).to(distance.dtype)
    p, n = labels.shape
    sizes = onehot.sum(1)
    weights = (onehot / sizes.clamp_min(1)[:, None, :]).permute(1, 0, 2).reshape(n, p * num)
    means = (distance @ weights).reshape(n, p, num).permute(1, 0, 2)
    return _silhouettes_from_means(means, labels, sizes)


def _silhouettes_from_means(means: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Silhouettes from ``means[p, i, k]`` = mean distance of client ``i`` to cluster ``k``
    under labelling ``p`` (``labels``: ``(P, N)``; cluster ``sizes``: ``(P, c)`` or ``(1, c)``)."""
    own_size = sizes.expand(labels.shape[0], -1).gather(1, labels)
    own = means.gather(2, labels[..., None]).squeeze(-1)
    a = own * own_size / (own_size - 1).clamp_min(1)
    b = means.scatter(2, labels[..., None], math.inf).min(2).values
    denom = torch.maximum(a, b)
    s = torch.where((own_size > 1) & (denom > 0), (b - a) / denom.clamp_min(1e-30), 0.0)
    return s.mean(1)


def block_permutations(blocks: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, N)`` random permutations of the clients that move each client only within its block."""
    perm = np.empty((count, len(blocks)), dtype=np.int64)
    perm[:, np.argsort(blocks, kind="stable")] = _block_orders(blocks, rng.random((count, len(blocks))))
    return perm


def _block_orders(blocks: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The clients sorted by block, then by ``keys`` (``(P, N)`` uniform draws): in row ``p``,
    the client at position ``t`` lends its label to the ``t``-th client in block order."""
    return np.argsort(blocks[None, :] * 2.0 + keys, axis=1)


@dataclass
class LayerCut:
    """One layer's decision: the count it took and the evidence for every count it tried."""

    count: int
    scores: dict[int, float]
    p_values: dict[int, float]


#: Relabellings the calibrated cut scores at a time; after each batch, the finer counts whose
#: test can no longer pass stop being tested (see :func:`cut_layer`).
RELABEL_BATCH = 16


def cut_layer(
    distance: torch.Tensor,
    cuts: Mapping[int, np.ndarray],
    c_prev: int,
    high: int,
    rule: CutRule,
    rng: np.random.Generator,
) -> LayerCut:
    """Choose one layer's count in ``[c_prev, high]`` over nested ``cuts`` (see :class:`CutRule`)
    under ``distance`` (symmetric, zero diagonal).

    The calibrated rule's test is sequential (Besag and Clifford 1991): the ``B``
    relabellings are scored ``RELABEL_BATCH`` at a time, and a finer count stops being
    tested once so many were at least as good as its cut that its p-value over all ``B``
    is above the level whatever the others would give. The decision is the full test's in
    every case, and so is the p-value of every count tested to the end; a count stopped
    after ``l`` relabellings, ``h`` of them at least as good, reports ``max(h / l, (1 + h) /
    (B + 1))`` (Besag and Clifford's p-value, kept above the level as the full test's
    is). All ``B`` relabellings are drawn from ``rng`` whether they are scored or not.
    """
    candidates = list(range(c_prev, high + 1))
    finer = [c for c in candidates if c > c_prev and c >= 2]
    draws = rule.permutations if rule.kind == "calibrated" and finer else 0
    keys = rng.random((draws, distance.shape[0]))
    scorer = _CutScorer(distance, cuts, c_prev, high)
    scores = scorer.observed([c for c in candidates if c >= 2])
    if rule.kind == "threshold":
        if c_prev == 1:
            scores = {1: rule.tau, **scores}
        return LayerCut(max(candidates, key=lambda c: (scores[c], -c)), scores, {})
    level = rule.alpha / max(len(finer), 1)
    exceed = dict.fromkeys(finer, 0)
    scored = dict.fromkeys(finer, 0)
    tested = list(finer)
    while tested:
        start = scored[tested[0]]
        orders = _block_orders(cuts[c_prev], keys[start : start + RELABEL_BATCH])
        for c, null in scorer.silhouettes(orders, tested).items():
            exceed[c] += int((null >= scores[c] - 1e-6).sum())
            scored[c] += len(orders)
        tested = [c for c in tested if scored[c] < draws and (1 + exceed[c]) / (draws + 1) <= level]
    p_values = {c: (1 + exceed[c]) / (draws + 1) for c in finer}
    for c in finer:
        if scored[c] < draws:
            p_values[c] = max(p_values[c], exceed[c] / scored[c])
    eligible = [c for c in finer if p_values[c] <= level]
    count = max(eligible, key=lambda c: (scores[c], -c)) if eligible else c_prev
    return LayerCut(count, scores, p_values)


class _CutScorer:
    """Silhouettes of one layer's nested cuts ``c_prev .. high`` under relabellings that move
    clients only within the clusters ("blocks") of the ``c_prev``-cut.

    Works at the finest cut: the mean distance of every client to each of its clusters.
    A relabelling changes only the clusters of the blocks the finer cuts split, so their
    means come from one product per split block (the distance's columns of the block's
    clients by the relabelled one-hot of that block's clusters), the others' are the
    observed ones; the coarser cuts' means are size-weighted sums of the finest one's.
    """

    def __init__(self, distance: torch.Tensor, cuts: Mapping[int, np.ndarray], c_prev: int, high: int) -> None:
        blocks, fine = cuts[c_prev], cuts[high]
        n = len(fine)
        self.high, self.fine = high, fine
        #: The clients in block order.
        self.order = np.argsort(blocks, kind="stable")
        self.position = np.empty(n, dtype=np.int64)
        self.position[self.order] = np.arange(n)
        first = _first_members(fine, high)
        sizes = np.bincount(fine, minlength=high)
        self.sizes = torch.from_numpy(sizes).to(distance.dtype)[None, :]
        block_of = blocks[first]
        onehot = torch.from_numpy(fine[:, None] == np.arange(high)[None, :]).to(distance.dtype)
        #: The observed mean distances ``(N, high)``.
        self.means = distance @ (onehot / self.sizes)
        self.fixed = torch.from_numpy(np.flatnonzero(np.bincount(block_of, minlength=c_prev)[block_of] == 1))
        bounds = np.concatenate([[0], np.cumsum(np.bincount(blocks, minlength=c_prev))])
        #: Per split block: its positions in block order, its clusters, their index among
        #: them by cluster, the distance's rows of its clients (its columns: the distance is
        #: symmetric) and the clusters' sizes.
        self.split: list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for block in np.unique(block_of):
            clusters = np.flatnonzero(block_of == block)
            if len(clusters) < 2:
                continue
            positions = slice(int(bounds[block]), int(bounds[block + 1]))
            local = np.zeros(high, dtype=np.int64)
            local[clusters] = np.arange(len(clusters))
            rows = distance.index_select(0, torch.from_numpy(self.order[positions]))
            cluster_sizes = self.sizes[0, torch.from_numpy(clusters)]
            self.split.append((positions, torch.from_numpy(clusters), torch.from_numpy(local), rows, cluster_sizes))
        self.to_coarse = {c: torch.from_numpy(cuts[c][first]) for c in range(c_prev, high + 1)}

    def observed(self, counts: Sequence[int]) -> dict[int, float]:
        """The silhouette of each cut in ``counts``."""
        sil = self._silhouettes(self.means[None], torch.from_numpy(self.fine)[None], counts)
        return {c: float(s[0]) for c, s in sil.items()}

    def silhouettes(self, orders: np.ndarray, counts: Sequence[int]) -> dict[int, torch.Tensor]:
        """Silhouettes ``(P,)`` of each cut in ``counts`` under the relabellings ``orders``
        (rows of :func:`_block_orders`)."""
        p, n = orders.shape
        in_order = torch.from_numpy(self.fine[orders])
        means = self.means.new_empty(p, n, self.high)
        means[:, :, self.fixed] = self.means[:, self.fixed]
        for positions, clusters, local, rows, sizes in self.split:
            f = len(clusters)
            block = local[in_order[:, positions]].T
            weights = (block[:, :, None] == torch.arange(f)).to(rows.dtype) / sizes
            product = rows.T @ weights.reshape(rows.shape[0], p * f)
            means[:, :, clusters] = product.reshape(n, p, f).permute(1, 0, 2)
        return self._silhouettes(means, in_order[:, torch.from_numpy(self.position)], counts)

    def _silhouettes(self, means: torch.Tensor, labels: torch.Tensor, counts: Sequence[int]) -> dict[int, torch.Tensor]:
        """Silhouettes of the cuts in ``counts`` from the finest cut's ``means`` and ``labels``."""
        out: dict[int, torch.Tensor] = {}
        for c in counts:
            to_coarse = self.to_coarse[c]
            if c == self.high:
                out[c] = _silhouettes_from_means(means, labels, self.sizes)
                continue
            sizes = torch.zeros(c, dtype=means.dtype).index_add_(0, to_coarse, self.sizes[0])
            merge = torch.zeros(self.high, c, dtype=means.dtype)
            merge[torch.arange(self.high), to_coarse] = self.sizes[0] / sizes[to_coarse]
            out[c] = _silhouettes_from_means(means @ merge, to_coarse[labels], sizes[None, :])
        return out


def _first_members(labels: np.ndarray, num: int) -> np.ndarray:
    """For each cluster ``0 .. num - 1`` of canonical ``labels``, its first client."""
    return np.array([int(np.flatnonzero(labels == k)[0]) for k in range(num)])


def choose_cluster_counts(
    tree: np.ndarray, distances: np.ndarray, window_k: int, rule: CutRule
) -> tuple[list[int], dict[int, np.ndarray], list[LayerCut]]:
    """Per-layer cluster counts, shallow to deep, over the cuts of one tree.

    Layer ``l`` tries ``c in [c_prev, min(N - 1, c_prev + K - 1)]`` under ``distances[l]``
    by ``rule`` and passes its choice on as ``c_prev`` (counts never decrease). Returns the
    counts, the cuts and every layer's :class:`LayerCut`.
    """
    num_layers, n = distances.shape[0], distances.shape[1]
    if n < 3:
        none = LayerCut(1, {1: rule.tau} if rule.kind == "threshold" else {}, {})
        return [1] * num_layers, {1: np.zeros(n, dtype=np.int64)}, [none] * num_layers
    highest = min(n - 1, 1 + num_layers * (window_k - 1))
    cuts = tree_cuts(tree, range(1, highest + 1))
    rng = np.random.default_rng(rule.seed)
    layers: list[LayerCut] = []
    c_prev = 1
    for layer in range(num_layers):
        high = max(c_prev, min(n - 1, c_prev + window_k - 1))
        decided = cut_layer(torch.from_numpy(_clean(distances[layer])), cuts, c_prev, high, rule, rng)
        c_prev = decided.count
        layers.append(decided)
    return [d.count for d in layers], cuts, layers


@dataclass
class ClientTree:
    """The clustering FedTreeLoRA works with: who shares which layer with whom.

    Attributes
    ----------
    clients
        Client ids, in the row order of every other field.
    counts
        Clusters per layer, shallow to deep.
    labels
        ``(L, N)``: each client's cluster at each layer.
    linkage
        The shared tree (``None`` for independent per-layer clustering).
    layer_linkages
        One tree per layer (independent per-layer clustering only).
    scores
        Per layer, the score of every cluster count tried (the silhouette; ``tau`` for 1
        under the threshold rule); empty when the counts were fixed.
    p_values
        Per layer, the permutation p-value of every finer count tested (calibrated rule).
    """

    clients: list[int]
    counts: list[int]
    labels: np.ndarray
    linkage: np.ndarray | None = None
    layer_linkages: list[np.ndarray] = field(default_factory=list)
    scores: list[dict[int, float]] = field(default_factory=list)
    p_values: list[dict[int, float]] = field(default_factory=list)

    def cluster_of(self, layer: int, client: int) -> int:
        return int(self.labels[layer, self.clients.index(client)])

    def members(self, layer: int, cluster: int) -> list[int]:
        return [c for c, lab in zip(self.clients, self.labels[layer].tolist(), strict=True) if lab == cluster]

    def partitions(self) -> list[list[list[int]]]:
        """Per layer, the client ids of each cluster."""
        return [[self.members(layer, j) for j in range(count)] for layer, count in enumerate(self.counts)]

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "counts": self.counts,
            "labels": self.labels.tolist(),
            "linkage": None if self.linkage is None else self.linkage.tolist(),
            "layer_linkages": [z.tolist() for z in self.layer_linkages],
            "scores": _json_counts(self.scores),
            "p_values": _json_counts(self.p_values),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ClientTree:
        return ClientTree(
            clients=[int(c) for c in data["clients"]],
            counts=[int(c) for c in data["counts"]],
            labels=np.asarray(data["labels"], dtype=np.int64),
            linkage=None if data["linkage"] is None else np.asarray(data["linkage"], dtype=np.float64),
            layer_linkages=[np.asarray(z, dtype=np.float64) for z in data["layer_linkages"]],
            scores=_from_json_counts(data.get("scores", [])),
            p_values=_from_json_counts(data.get("p_values", [])),
        )


def _json_counts(per_layer: Sequence[Mapping[int, float]]) -> list[dict[str, float]]:
    return [{str(c): v for c, v in layer.items()} for layer in per_layer]


def _from_json_counts(per_layer: Sequence[Mapping[str, float]]) -> list[dict[int, float]]:
    return [{int(c): float(v) for c, v in layer.items()} for layer in per_layer]


def plan_tree(distances: Distances, clients: Sequence[int], options: FedTreeLoraOptions, seed: int = 0) -> ClientTree:
    """Build the tree and each layer's cut from per-layer distances.

    The tree is built on ``distances.full``. The threshold rule scores its cuts under each
    layer's full distances; the calibrated rule decides the counts on a second tree built
    on ``distances.fit``, tested under ``distances.test`` (``seed`` drives its relabellings),
    and the clients get the cuts of the first tree at those counts.
    """
    full = distances.full
    num_layers, n = full.shape[0], full.shape[1]
    if n < 2:
        return ClientTree(list(clients), [1] * num_layers, np.zeros((num_layers, n), dtype=np.int64))
    rule = CutRule.from_options(options, seed)
    if options.independent_layers:
        trees = [build_tree(full[layer], options.linkage) for layer in range(num_layers)]
        rows = []
        decided: list[LayerCut] = []
        for layer, tree in enumerate(trees):
            one_layer = Distances(*(d[layer : layer + 1] for d in (full, distances.fit, distances.test)))
            (one,) = decide_counts(tree, one_layer, options, dataclasses.replace(rule, seed=seed + layer))
            rows.append(tree_cuts(tree, [one.count])[one.count])
            decided.append(one)
        return ClientTree(
            list(clients),
            [d.count for d in decided],
            np.stack(rows),
            layer_linkages=trees,
            scores=[d.scores for d in decided],
            p_values=[d.p_values for d in decided],
        )
    tree = build_tree(full.mean(0), options.linkage)
    if options.fixed_k:
        count = min(options.fixed_k, n)
        cut = tree_cuts(tree, [count])[count]
        return ClientTree(list(clients), [count] * num_layers, np.stack([cut] * num_layers), linkage=tree)
    decided = decide_counts(tree, distances, options, rule)
    counts = [d.count for d in decided]
    cuts = tree_cuts(tree, counts)
    return ClientTree(
        list(clients),
        counts,
        np.stack([cuts[c] for c in counts]),
        linkage=tree,
        scores=[d.scores for d in decided],
        p_values=[d.p_values for d in decided],
    )


def tree_fit(tree: ClientTree, distances: np.ndarray) -> float | None:
    """Cophenetic correlation between ``tree`` and per-layer distances ``(L, N, N)``: of the
    shared tree against their mean, or the mean over layers of each layer's own tree
    (independent layers). ``None`` where it is undefined (under 3 clients, constant distances)."""
    if len(tree.clients) < 3:
        return None
    if tree.linkage is not None:
        pairs = [(tree.linkage, distances.mean(0))]
    else:
        pairs = list(zip(tree.layer_linkages, distances, strict=True))
    values = []
    for linkage, distance in pairs:
        condensed = squareform(_clean(distance), checks=False)
        if np.ptp(condensed) == 0 or np.ptp(linkage[:, 2]) == 0:
            return None
        values.append(float(cophenet(linkage, condensed)[0]))
    return float(np.mean(values))


def decide_counts(tree: np.ndarray, distances: Distances, options: FedTreeLoraOptions, rule: CutRule) -> list[LayerCut]:
    """Every layer's count: on ``tree`` and the full distances (threshold), or on a tree of
    the ``fit`` distances tested under the ``test`` distances (calibrated)."""
    if rule.kind == "threshold":
        return choose_cluster_counts(tree, distances.full, options.window_k, rule)[2]
    fit_tree = build_tree(distances.fit.mean(0), options.linkage)
    return choose_cluster_counts(fit_tree, distances.test, options.window_k, rule)[2]


# --- the algorithm ---------------------------------------------------------------------------
@register
class FedTreeLora(Algorithm):
    name = "fedtreelora"
    description = "FedTreeLoRA: one client tree, cut per layer; cluster + external experts mixed by a private lambda"
    paper = "arXiv 2603.13282"
    options_class = FedTreeLoraOptions
    options: FedTreeLoraOptions
    client_hooks = ReportLambdas

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        opts = self.options
        if opts.fixed_k > len(ctx.client_ids):
            raise FedLoraError(
                f"algorithm.fixed_k = {opts.fixed_k} but the federation has {len(ctx.client_ids)} clients"
            )
        self.lr_multipliers = {f"*.{MIX_SLOT}.theta": self.theta_lr_multiplier(ctx, opts)}
        self.theta0 = math.log(opts.lambda_init / (1.0 - opts.lambda_init))
        self.warmup_layout = self.lora_layout(slot=CLUSTER_SLOT)
        cluster = SlotSpec(CLUSTER_SLOT, ctx.rank, ctx.alpha)
        external = SlotSpec(EXTERNAL_SLOT, ctx.rank, ctx.alpha, train_a=False, train_b=False)
        self.root_module = ModuleLayout(slots=(cluster,), mixing="lambda")
        self.mixed_module = ModuleLayout(slots=(cluster, external), mixing="lambda")
        self.init = init_state(self.warmup_layout, ctx.module_shapes, ctx.seed)
        self.layer_keys: dict[int, list[str]] = {}
        for mid in ctx.module_ids:
            self.layer_keys.setdefault(mid.layer, []).extend(make_key(mid, CLUSTER_SLOT, f) for f in ("A", "B"))
        #: Each client's latest upload (its cluster expert after local training).
        self.latest: dict[int, Tensors] = {}
        #: FedIT warmup's global LoRA.
        self.global_lora: Tensors = dict(self.init)
        self.tree: ClientTree | None = None
        self.built_round = -1
        #: Every (re)build: round, reason, the fit that triggered it, counts and partitions.
        self.history: list[dict[str, Any]] = []
        #: ``[round, cophenetic correlation]`` of the tree against the clients after each
        #: post-warmup round (``rebuild_fit > 0`` only).
        self.fit_by_round: list[list[Any]] = []
        #: Modules where a client holds a trained theta in its private state.
        self.has_theta: dict[int, set[str]] = {}
        #: ``(layer, cluster)`` -> cluster expert and external expert tensors.
        self.cluster_experts: dict[tuple[int, int], Tensors] = {}
        self.external_experts: dict[tuple[int, int], Tensors] = {}

    @staticmethod
    def theta_lr_multiplier(ctx: FederationContext, opts: FedTreeLoraOptions) -> float:
        """The multiplier of ``train.lr`` that gives ``theta`` its rate: ``lambda_lr / lr``,
        or ``lambda_lr_mult`` when ``lambda_lr = 0``."""
        if not opts.lambda_lr:
            return opts.lambda_lr_mult
        if not ctx.lr or ctx.lr <= 0:
            raise FedLoraError(
                "algorithm.lambda_lr needs the clients' learning rate (train.lr) in the federation context; "
                "set algorithm.lambda_lr = 0 to use lambda_lr_mult"
            )
        return opts.lambda_lr / ctx.lr

    # --- layouts ----------------------------------------------------------------------
    def is_mixed(self, layer: int) -> bool:
        """Whether a layer has an external expert (not a root layer, not ablated)."""
        return self.tree is not None and self.tree.counts[layer] > 1 and not self.options.no_external

    def client_layout(self) -> Layout:
        return Layout(
            {mid: self.mixed_module if self.is_mixed(mid.layer) else self.root_module for mid in self.ctx.module_ids}
        )

    # --- rounds -----------------------------------------------------------------------
    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        if self.tree is None:
            if self.options.warmup_mode == "fedit":
                return {c: Payload(self.warmup_layout, self.global_lora) for c in clients}
            return {c: Payload(self.warmup_layout, self.latest.get(c, {})) for c in clients}
        layout = self.client_layout()
        upload = (f"*.{CLUSTER_SLOT}.A", f"*.{CLUSTER_SLOT}.B")
        payloads: dict[int, Payload] = {}
        for c in clients:
            tensors: Tensors = {}
            for layer in self.layer_keys:
                cluster = self.tree.cluster_of(layer, c)
                tensors.update(self.cluster_experts[(layer, cluster)])
                if self.is_mixed(layer):
                    tensors.update(self.external_experts[(layer, cluster)])
            for mid in self.ctx.module_ids:
                if self.is_mixed(mid.layer) and mid.prefix() not in self.has_theta.get(c, set()):
                    tensors[make_key(mid, MIX_SLOT, "theta")] = torch.tensor(self.theta0)
            payloads[c] = Payload(layout, tensors, upload=upload)
        return payloads

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        mixed = {mid.prefix() for mid in self.ctx.module_ids if self.is_mixed(mid.layer)}
        for c, update in updates.items():
            self.latest[c] = dict(update.tensors)
            self.has_theta[c] = set(mixed)
        if self.tree is None and self.options.warmup_mode == "fedit" and updates:
            self.global_lora = self.client_mean({c: u.tensors for c, u in updates.items()})
        reason, distances, fit = self.rebuild_reason(rnd)
        if reason:
            distances = distances or self.distances()
            self.tree = plan_tree(distances, self.ctx.client_ids, self.options, self.ctx.seed + rnd)
            self.built_round = rnd
            self.history.append(
                {
                    "round": rnd,
                    "reason": reason,
                    "fit": fit,
                    "cluster_counts": self.tree.counts,
                    "partitions": self.tree.partitions(),
                }
            )
        if self.tree is not None:
            self.update_experts()

    def rebuild_reason(self, rnd: int) -> tuple[str, Distances | None, float | None]:
        """Why the tree is (re)built after round ``rnd`` ("" = it is not), the distances
        computed to decide it, and the tree's fit to them (``rebuild_fit`` only)."""
        opts = self.options
        if self.tree is None:
            return ("warmup" if rnd + 1 >= opts.warmup_rounds else ""), None, None
        if opts.rebuild_every > 0 and rnd - self.built_round >= opts.rebuild_every:
            return "every", None, None
        if opts.rebuild_fit <= 0:
            return "", None, None
        distances = self.distances()
        fit = tree_fit(self.tree, distances.full)
        self.fit_by_round.append([rnd, fit])
        return ("drift" if fit is not None and fit < opts.rebuild_fit else ""), distances, fit

    # --- server computations ------------------------------------------------------------
    def distances(self) -> Distances:
        """Per-layer ``(L, N, N)`` client distances from the latest uploaded B factors (B = 0 if none yet)."""
        clients = self.ctx.client_ids
        by_layer: dict[int, list[torch.Tensor]] = {}
        for mid in self.ctx.module_ids:
            key = make_key(mid, CLUSTER_SLOT, "B")
            rows = [self.latest.get(c, self.init)[key] for c in clients]
            by_layer.setdefault(mid.layer, []).append(torch.stack(rows))
        return layer_distances([by_layer[layer] for layer in sorted(by_layer)], self.options.distance)

    def expert(self, clients: Sequence[int], keys: Sequence[str]) -> Tensors:
        """Mean of the clients' latest uploads over ``keys`` (the seeded init if none uploaded)."""
        uploaded = [c for c in clients if c in self.latest]
        if not uploaded:
            return {k: self.init[k] for k in keys}
        return self.client_mean({c: {k: self.latest[c][k] for k in keys} for c in uploaded})

    def update_experts(self) -> None:
        """Recompute every cluster expert and every cluster's external expert."""
        assert self.tree is not None
        self.cluster_experts = {}
        self.external_experts = {}
        for layer, keys in self.layer_keys.items():
            for cluster in range(self.tree.counts[layer]):
                members = self.tree.members(layer, cluster)
                self.cluster_experts[(layer, cluster)] = self.expert(members, keys)
                if self.is_mixed(layer):
                    rest = [c for c in self.ctx.client_ids if c not in set(members)]
                    external = self.expert(rest, keys)
                    self.external_experts[(layer, cluster)] = {_to_external(k): v for k, v in external.items()}

    # --- inspection and checkpoints -----------------------------------------------------
    def structure(self) -> dict[str, Any]:
        if self.tree is None:
            return {}
        return {
            "linkage": None if self.tree.linkage is None else self.tree.linkage.tolist(),
            "layer_linkages": [z.tolist() for z in self.tree.layer_linkages],
            "clients": self.tree.clients,
            "cluster_counts": self.tree.counts,
            "cut_rule": self.options.cut,
            "cut_scores": _json_counts(self.tree.scores),
            "cut_p_values": _json_counts(self.tree.p_values),
            "partitions": self.tree.partitions(),
            "built_round": self.built_round,
            "tree_history": self.history,
            "tree_fit": self.fit_by_round,
        }

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = {f"latest/{c}/{k}": v for c, t in self.latest.items() for k, v in t.items()}
        tensors.update({f"global/{k}": v for k, v in self.global_lora.items()})
        meta = {
            "tree": None if self.tree is None else self.tree.to_json(),
            "built_round": self.built_round,
            "history": self.history,
            "fit_by_round": self.fit_by_round,
            "has_theta": {str(c): sorted(s) for c, s in self.has_theta.items()},
        }
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.latest = {}
        self.global_lora = {}
        for name, value in tensors.items():
            kind, rest = name.split("/", 1)
            if kind == "latest":
                client, key = rest.split("/", 1)
                self.latest.setdefault(int(client), {})[key] = value
            else:
                self.global_lora[rest] = value
        self.tree = None if meta["tree"] is None else ClientTree.from_json(meta["tree"])
        self.built_round = int(meta["built_round"])
        self.history = list(meta.get("history", []))
        self.fit_by_round = list(meta.get("fit_by_round", []))
        self.has_theta = {int(c): set(s) for c, s in meta["has_theta"].items()}
        if self.tree is not None:
            self.update_experts()


def _to_external(key: str) -> str:
    parsed = parse_key(key)
    return make_key(parsed.module_id, EXTERNAL_SLOT, parsed.factor)
