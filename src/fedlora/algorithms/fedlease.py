"""fedlease: FedLEASE, clustered LoRA experts mixed by a router.

Paper: "FedLEASE: Adaptive LoRA Experts Allocation and Selection in
Federated Fine-Tuning" (arXiv 2509.15087, NeurIPS 2025).

1. Warmup: for ``warmup_rounds`` rounds every client trains its own LoRA locally (no
   aggregation). In the last warmup round it uploads that LoRA.
2. Clustering, once: ``D[i, j]`` = mean over modules of ``1 - cos(B_i, B_j)`` (flattened
   B factors); average-linkage agglomerative clustering of ``D``; the number of clusters
   ``M`` in ``2..min(max_clusters, N - 1)`` maximizes the silhouette (``M = 1`` with fewer
   than 3 clients).
3. Experts: cluster ``e`` owns one LoRA expert (slot ``expert<e>``), initialized as the
   weighted mean of its members' warmup LoRAs and FedIT-averaged within the cluster each
   round.
4. A client's module mixes all ``M`` experts with a token router ``Linear(d_in -> M)`` +
   softmax **[choice: all experts, top-M unrestricted]**; it trains its own cluster's
   expert and the router, the other experts are frozen. Routers are averaged within the
   cluster **[choice]**.

Clients absent from the last warmup round (partial participation) join the largest
cluster. ``structure``: the chosen ``M``, the silhouette of every candidate, each client's
cluster and the distance matrix.

Options
-------
warmup_rounds : int >= 1, default 5: rounds of local training before clustering (the same key as
    fedtreelora's; the former name ``warmup`` is refused with a message naming this one)
max_clusters : int >= 2, default 4: the largest M tried
weighting : "examples" (default) or "uniform": weights of the within-cluster averages
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from fedlora.algorithms.base import (
    Algorithm,
    FederationContext,
    Options,
    Payload,
    Tensors,
    Update,
    WeightingOptions,
    register,
)
from fedlora.algorithms.fedalt import rename_slot
from fedlora.errors import FedLoraError
from fedlora.lora import ROUTER_SLOT, Layout, ModuleLayout, SlotSpec, make_key, parse_key

WARMUP_SLOT = "lora"


def expert_slot(e: int) -> str:
    return f"expert{e}"


@dataclass
class FedLeaseOptions(WeightingOptions):
    warmup_rounds: int = 5
    max_clusters: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_rounds < 1:
            raise FedLoraError(f"algorithm.warmup_rounds = {self.warmup_rounds}: use at least 1 round of local warmup")
        if self.max_clusters < 2:
            raise FedLoraError(f"algorithm.max_clusters = {self.max_clusters}: use 2 or more")


def b_cosine_distances(loras: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """``D[i, j]`` = mean over modules of ``1 - cos`` of the flattened B factors (0 on the diagonal)."""
    b_keys = sorted(k for k in loras[0] if parse_key(k).factor == "B")
    n = len(loras)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for key in b_keys:
        flat = torch.stack([lora[key].reshape(-1).double() for lora in loras])
        cos = F.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1, eps=1e-12)
        dist += 1.0 - cos
    dist /= len(b_keys)
    dist.fill_diagonal_(0.0)
    return dist.clamp(min=0.0).numpy()


def cluster_by_silhouette(dist: np.ndarray, max_clusters: int) -> tuple[list[int], dict[int, float]]:
    """Average-linkage clusters (labels 0..M-1) with M chosen by silhouette, and each candidate's score."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics import silhouette_score

    n = dist.shape[0]
    if n < 3:
        return [0] * n, {}
    tree = linkage(squareform(dist, checks=False), method="average")
    scores: dict[int, float] = {}
    best: tuple[float, list[int]] | None = None
    for m in range(2, min(max_clusters, n - 1) + 1):
        labels = fcluster(tree, t=m, criterion="maxclust")
        if len(set(labels)) < 2:
            continue
        score = float(silhouette_score(dist, labels, metric="precomputed"))
        scores[m] = score
        if best is None or score > best[0]:
            best = (score, [int(x) for x in labels])
    if best is None:
        return [0] * n, scores
    # Relabel 0..M-1 in order of first appearance, so expert ids do not depend on scipy's numbering.
    order: dict[int, int] = {}
    return [order.setdefault(x, len(order)) for x in best[1]], scores


@register
class FedLease(Algorithm):
    name = "fedlease"
    description = "FedLEASE: B-similarity clusters after warmup, one LoRA expert per cluster, router over experts"
    paper = "arXiv 2509.15087"
    options_class = FedLeaseOptions
    options: FedLeaseOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.warmup_layout = self.lora_layout(slot=WARMUP_SLOT)
        self.clusters: dict[int, int] = {}
        self.experts: dict[int, Tensors] = {}
        self.routers: dict[int, Tensors] = {}
        self.silhouettes: dict[int, float] = {}
        self.distances: list[list[float]] = []
        self.clustered_clients: list[int] = []

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_layout(self, own: int) -> Layout:
        slots = tuple(
            SlotSpec(expert_slot(e), self.ctx.rank, self.ctx.alpha, train_a=e == own, train_b=e == own)
            for e in range(self.num_experts)
        )
        return Layout.uniform(self.ctx.module_ids, ModuleLayout(slots=slots, mixing="router"))

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        if rnd < self.options.warmup_rounds:
            last = rnd == self.options.warmup_rounds - 1
            return {c: Payload(self.warmup_layout, {}, upload=("*",) if last else ()) for c in clients}
        experts = {k: v for e in range(self.num_experts) for k, v in self.experts[e].items()}
        return {
            c: Payload(self.expert_layout(self.clusters[c]), {**experts, **self.routers[self.clusters[c]]})
            for c in clients
        }

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates or rnd < self.options.warmup_rounds - 1:
            return
        if rnd == self.options.warmup_rounds - 1:
            self._cluster({c: u.tensors for c, u in updates.items()})
            return
        for e in range(self.num_experts):
            members = [c for c in updates if self.clusters[c] == e]
            if not members:
                continue
            mean = self.client_mean({c: updates[c].tensors for c in members})
            self.experts[e] = {k: v for k, v in mean.items() if parse_key(k).slot == expert_slot(e)}
            self.routers[e] = {k: v for k, v in mean.items() if parse_key(k).slot == ROUTER_SLOT}

    def _cluster(self, warmup: Mapping[int, Tensors]) -> None:
        seen = sorted(warmup)
        dist = b_cosine_distances([warmup[c] for c in seen])
        labels, self.silhouettes = cluster_by_silhouette(dist, self.options.max_clusters)
        self.distances = dist.tolist()
        self.clustered_clients = seen
        self.clusters = dict(zip(seen, labels, strict=True))
        sizes = np.bincount(labels)
        for c in self.ctx.client_ids:
            self.clusters.setdefault(c, int(sizes.argmax()))
        for e in range(len(sizes)):
            members = [c for c in seen if self.clusters[c] == e]
            mean = self.client_mean({c: warmup[c] for c in members})
            self.experts[e] = rename_slot(mean, WARMUP_SLOT, expert_slot(e))
        m = len(sizes)
        for e in range(m):
            self.routers[e] = {}
            for mid, (_, d_in) in self.ctx.module_shapes.items():
                self.routers[e][make_key(mid, ROUTER_SLOT, "weight")] = torch.zeros(m, d_in)
                self.routers[e][make_key(mid, ROUTER_SLOT, "bias")] = torch.zeros(m)

    def structure(self) -> dict[str, Any]:
        return {
            "warmup_rounds": self.options.warmup_rounds,
            "num_clusters": self.num_experts,
            "silhouette": {str(m): s for m, s in self.silhouettes.items()},
            "clusters": {str(c): e for c, e in sorted(self.clusters.items())},
            "distance_clients": self.clustered_clients,
            "distance": self.distances,
        }

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors: Tensors = {}
        for e in range(self.num_experts):
            tensors.update(self.experts[e])
            tensors.update({f"router{e}/{k}": v for k, v in self.routers[e].items()})
        meta = {
            "clusters": {str(c): e for c, e in self.clusters.items()},
            "silhouettes": {str(m): s for m, s in self.silhouettes.items()},
            "distances": self.distances,
            "clustered_clients": self.clustered_clients,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.clusters = {int(c): int(e) for c, e in meta["clusters"].items()}
        self.silhouettes = {int(m): float(s) for m, s in meta["silhouettes"].items()}
        self.distances = meta["distances"]
        self.clustered_clients = [int(c) for c in meta["clustered_clients"]]
        m = len(set(self.clusters.values()))
        self.experts = {e: {} for e in range(m)}
        self.routers = {e: {} for e in range(m)}
        for key, value in tensors.items():
            if key.startswith("router"):
                prefix, name = key.split("/", 1)
                self.routers[int(prefix.removeprefix("router"))][name] = value
            else:
                self.experts[int(parse_key(key).slot.removeprefix("expert"))][key] = value
