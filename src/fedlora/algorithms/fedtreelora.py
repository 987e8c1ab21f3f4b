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
3. **Tree**: scipy ``linkage`` of ``D`` (``linkage = "average" | "complete" | "single"``).
   ``P_c`` is the cut of the tree into exactly ``c`` clusters; cuts are nested.
4. **Cluster count per layer**, shallow to deep from ``c_prev = 1``: candidates
   ``c in [c_prev, min(N - 1, c_prev + K - 1)]``, ``score(1) = tau``, ``score(c >= 2)`` =
   silhouette of ``P_c`` under the layer's own distances ``D_l``; ``c_l = argmax`` (the
   smallest on ties), ``c_prev = c_l``. Counts never decrease with depth.
5. **Experts**: for client k at layer l with cluster S (in ``P_{c_l}``), the cluster
   expert is the factor-wise mean of the members' uploads over S and the external expert
   the mean over the other clients (``weighting = "uniform"`` as in the paper, or
   ``"examples"``). Root layers (``c_l = 1``) have no external expert and lambda = 1.
6. **Client model** per module: ``h = W0 x + lam s B_c A_c x + (1 - lam) s B_e A_e x``,
   ``lam = sigmoid(theta)`` per client and module; the client trains the cluster expert and
   ``theta`` (private, learning rate ``lambda_lr_mult`` times the LoRA rate), the external
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
tau : float, default 0.2
    The score of not splitting: a layer splits only where some cut's silhouette beats it.
lambda_init : float, default 0.5
    Initial lambda (``theta0 = logit(lambda_init)``), in (0, 1).
lambda_lr_mult : float, default 10.0
    Learning-rate multiplier of ``theta``.
weighting : "uniform" (default) or "examples"
    Weights of the expert means (uniform as in the paper, or by training examples).
rebuild_every : int, default 0
    Rebuild the tree and the cuts every R rounds from the latest uploads (0 = never).
fixed_k : int, default 0
    Ablation: cut the tree into this many clusters at every layer (0 = choose per layer).
independent_layers : bool, default False
    Ablation: cluster every layer on its own distances with its own tree, each starting
    from ``c_prev = 1`` (no shared tree, no monotonicity).
no_external : bool, default False
    Ablation: no external expert anywhere (lambda = 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

from fedlora.algorithms.base import (
    Algorithm,
    FederationContext,
    Options,
    Payload,
    ReportLambdas,
    Tensors,
    Update,
    register,
    weighted_mean,
)
from fedlora.errors import FedLoraError
from fedlora.lora import MIX_SLOT, Layout, ModuleLayout, SlotSpec, init_state, make_key, parse_key

CLUSTER_SLOT = "cluster"
EXTERNAL_SLOT = "external"
DISTANCES = ("frobenius", "cosine")
LINKAGES = ("average", "complete", "single")


@dataclass
class FedTreeLoraOptions(Options):
    warmup_rounds: int = 5
    warmup_mode: str = "local"
    distance: str = "frobenius"
    linkage: str = "average"
    window_k: int = 3
    tau: float = 0.2
    lambda_init: float = 0.5
    lambda_lr_mult: float = 10.0
    weighting: str = "uniform"
    rebuild_every: int = 0
    fixed_k: int = 0
    independent_layers: bool = False
    no_external: bool = False

    def __post_init__(self) -> None:
        choices = {
            "warmup_mode": ("local", "fedit"),
            "distance": DISTANCES,
            "linkage": LINKAGES,
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
        if not 0.0 < self.lambda_init < 1.0:
            raise FedLoraError(
                f"algorithm.lambda_init = {self.lambda_init}: lambda is a sigmoid; use a value in (0, 1)"
            )
        if self.lambda_lr_mult <= 0:
            raise FedLoraError(f"algorithm.lambda_lr_mult = {self.lambda_lr_mult}: use a positive multiplier")
        if self.rebuild_every < 0:
            raise FedLoraError(f"algorithm.rebuild_every = {self.rebuild_every}: use 0 (never) or a number of rounds")
        if self.fixed_k < 0:
            raise FedLoraError(f"algorithm.fixed_k = {self.fixed_k}: use 0 (choose per layer) or a cluster count")
        if self.fixed_k and self.independent_layers:
            raise FedLoraError("algorithm.fixed_k and algorithm.independent_layers are separate ablations; pick one")


# --- the client tree: pure functions over distance matrices ------------------------------
def layer_distances(b_factors: Sequence[Sequence[torch.Tensor]], metric: str = "frobenius") -> np.ndarray:
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
    np.ndarray
        ``(L, N, N)`` float64: ``D_l`` = mean over the layer's modules, zero diagonal.
    """
    out = []
    for modules in b_factors:
        per_module = []
        for b in modules:
            x = b.reshape(b.shape[0], -1).double()
            if metric == "frobenius":
                d = torch.cdist(x, x)
            elif metric == "cosine":
                unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
                d = (1.0 - unit @ unit.T).clamp_min(0.0)
            else:
                raise FedLoraError(f"distance {metric!r}: use one of {', '.join(DISTANCES)}")
            per_module.append(d)
        layer = torch.stack(per_module).mean(0).numpy()
        np.fill_diagonal(layer, 0.0)
        out.append(layer)
    return np.stack(out)


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

    Labels are canonical: clusters are numbered in order of their first client.
    """
    wanted = sorted(set(counts))
    if not wanted:
        return {}
    cuts = cut_tree(tree, n_clusters=wanted)
    return {c: canonical_labels(cuts[:, i]) for i, c in enumerate(wanted)}


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster labels 0, 1, ... in order of first appearance."""
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(x), len(order)) for x in labels], dtype=np.int64)


def _score(distance: np.ndarray, labels: np.ndarray, tau: float) -> float:
    if len(set(labels.tolist())) == 1:
        return tau
    return float(silhouette_score(_clean(distance), labels, metric="precomputed"))


def choose_cluster_counts(
    tree: np.ndarray, distances: np.ndarray, window_k: int, tau: float
) -> tuple[list[int], dict[int, np.ndarray], list[dict[int, float]]]:
    """Per-layer cluster counts, shallow to deep, over the cuts of one tree.

    Layer ``l`` tries ``c in [c_prev, min(N - 1, c_prev + K - 1)]``; ``score(1) = tau``,
    ``score(c >= 2)`` is the silhouette of the cut under ``distances[l]``; it takes the best
    (the smallest on ties) and passes it on as ``c_prev``. Returns the counts, the cuts and,
    per layer, the score of every count it tried.
    """
    num_layers, n = distances.shape[0], distances.shape[1]
    if n < 3:
        return [1] * num_layers, {1: np.zeros(n, dtype=np.int64)}, [{1: tau} for _ in range(num_layers)]
    highest = min(n - 1, 1 + num_layers * (window_k - 1))
    cuts = tree_cuts(tree, range(1, highest + 1))
    counts: list[int] = []
    tried: list[dict[int, float]] = []
    c_prev = 1
    for layer in range(num_layers):
        candidates = range(c_prev, max(c_prev, min(n - 1, c_prev + window_k - 1)) + 1)
        scores = [_score(distances[layer], cuts[c], tau) for c in candidates]
        c_prev = candidates[int(np.argmax(scores))]
        counts.append(c_prev)
        tried.append(dict(zip(candidates, scores, strict=True)))
    return counts, cuts, tried


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
        Per layer, the score of every cluster count tried (``tau`` for 1, else the
        silhouette); empty when the counts were fixed.
    """

    clients: list[int]
    counts: list[int]
    labels: np.ndarray
    linkage: np.ndarray | None = None
    layer_linkages: list[np.ndarray] = field(default_factory=list)
    scores: list[dict[int, float]] = field(default_factory=list)

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
            "scores": self.json_scores(),
        }

    def json_scores(self) -> list[dict[str, float]]:
        return [{str(c): score for c, score in layer.items()} for layer in self.scores]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ClientTree:
        return ClientTree(
            clients=[int(c) for c in data["clients"]],
            counts=[int(c) for c in data["counts"]],
            labels=np.asarray(data["labels"], dtype=np.int64),
            linkage=None if data["linkage"] is None else np.asarray(data["linkage"], dtype=np.float64),
            layer_linkages=[np.asarray(z, dtype=np.float64) for z in data["layer_linkages"]],
            scores=[{int(c): float(v) for c, v in layer.items()} for layer in data.get("scores", [])],
        )


def plan_tree(distances: np.ndarray, clients: Sequence[int], options: FedTreeLoraOptions) -> ClientTree:
    """Build the tree and each layer's cut from per-layer distances ``(L, N, N)``."""
    num_layers, n = distances.shape[0], distances.shape[1]
    if n < 2:
        return ClientTree(list(clients), [1] * num_layers, np.zeros((num_layers, n), dtype=np.int64))
    if options.independent_layers:
        trees = [build_tree(distances[layer], options.linkage) for layer in range(num_layers)]
        counts: list[int] = []
        rows = []
        scores: list[dict[int, float]] = []
        for layer, tree in enumerate(trees):
            (count,), cuts, (tried,) = choose_cluster_counts(
                tree, distances[layer : layer + 1], options.window_k, options.tau
            )
            counts.append(count)
            rows.append(cuts[count])
            scores.append(tried)
        return ClientTree(list(clients), counts, np.stack(rows), layer_linkages=trees, scores=scores)
    tree = build_tree(distances.mean(0), options.linkage)
    if options.fixed_k:
        count = min(options.fixed_k, n)
        cut = tree_cuts(tree, [count])[count]
        return ClientTree(list(clients), [count] * num_layers, np.stack([cut] * num_layers), linkage=tree)
    counts, cuts, scores = choose_cluster_counts(tree, distances, options.window_k, options.tau)
    return ClientTree(list(clients), counts, np.stack([cuts[c] for c in counts]), linkage=tree, scores=scores)


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
        self.lr_multipliers = {f"*.{MIX_SLOT}.theta": opts.lambda_lr_mult}
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
        #: Modules where a client holds a trained theta in its private state.
        self.has_theta: dict[int, set[str]] = {}
        #: ``(layer, cluster)`` -> cluster expert and external expert tensors.
        self.cluster_experts: dict[tuple[int, int], Tensors] = {}
        self.external_experts: dict[tuple[int, int], Tensors] = {}

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
            weights = self.weights(list(updates), self.options.weighting)
            self.global_lora = weighted_mean({c: u.tensors for c, u in updates.items()}, weights)
        rebuild = self.options.rebuild_every > 0 and rnd - self.built_round >= self.options.rebuild_every
        if (self.tree is None and rnd + 1 >= self.options.warmup_rounds) or (self.tree is not None and rebuild):
            self.tree = plan_tree(self.distances(), self.ctx.client_ids, self.options)
            self.built_round = rnd
        if self.tree is not None:
            self.update_experts()

    # --- server computations ------------------------------------------------------------
    def distances(self) -> np.ndarray:
        """``(L, N, N)`` client distances from the latest uploaded B factors (B = 0 if none yet)."""
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
        weights = self.weights(uploaded, self.options.weighting)
        return weighted_mean({c: {k: self.latest[c][k] for k in keys} for c in uploaded}, weights)

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
            "cut_scores": self.tree.json_scores(),
            "partitions": self.tree.partitions(),
            "built_round": self.built_round,
        }

    @classmethod
    def draw(cls, structure: dict[str, Any], out_dir: Path) -> list[Path]:
        if not structure.get("cluster_counts"):
            return []
        drawn = [draw_cluster_counts(structure["cluster_counts"], out_dir / "clusters_per_layer.png")]
        if structure.get("linkage"):
            drawn.append(draw_dendrogram(structure["linkage"], structure["clients"], out_dir / "client_tree.png"))
        return drawn

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = {f"latest/{c}/{k}": v for c, t in self.latest.items() for k, v in t.items()}
        tensors.update({f"global/{k}": v for k, v in self.global_lora.items()})
        meta = {
            "tree": None if self.tree is None else self.tree.to_json(),
            "built_round": self.built_round,
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
        self.has_theta = {int(c): set(s) for c, s in meta["has_theta"].items()}
        if self.tree is not None:
            self.update_experts()


def _to_external(key: str) -> str:
    parsed = parse_key(key)
    return make_key(parsed.module_id, EXTERNAL_SLOT, parsed.factor)


def draw_cluster_counts(counts: Sequence[int], out: Path) -> Path:
    """Bar chart of clusters per layer, shallow to deep (the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(counts) + 2), 3.2))
    ax.bar(range(len(counts)), counts, color="tab:green")
    ax.set(xlabel="layer (0 = shallowest)", ylabel="clusters", title="clusters per layer")
    ax.set_xticks(range(len(counts)))
    ax.set_yticks(range(max(counts, default=1) + 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_dendrogram(linkage: Sequence[Sequence[float]], clients: Sequence[int], out: Path) -> Path:
    """The client tree as a dendrogram, leaves labelled by client id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(clients) + 2), 3.6))
    dendrogram(np.asarray(linkage, dtype=np.float64), labels=[str(c) for c in clients], ax=ax)
    ax.set(xlabel="client", ylabel="distance (mean over layers)", title="client tree")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
