"""hetlora: HetLoRA, zero-padded heterogeneous ranks with norm-weighted aggregation.

Paper: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models" (arXiv 2401.06432).

As ``zeropad`` (server factors at ``r_max``; client ``k`` takes the leading ``r_k``
components, rescaled so that it starts from the global model's truncation at the global
scaling; uploads rescaled back and zero-padded), but each module's factors are averaged with weights
proportional to the norm of the client's update on that module,
``p_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F`` (sparsity-weighted aggregation:
clients that moved more count more). A module on which every client's product is zero
is averaged uniformly.

Rank self-pruning (optional): with ``prune_decay = gamma < 1``, after each round a
client whose trailing components ``j >= ceil(gamma r_k)`` carry less than
``prune_threshold`` of its update norm (``||s B_tail A_tail||_F / ||s B A||_F``, summed
over modules) drops to rank ``max(1, ceil(gamma r_k))`` for the following rounds. The
server decides from the uploaded factors, which is the client's own decision made where
it is visible. **[choice]** The paper's training-time penalty on the trailing components
is not applied; pruning only follows from the norms the clients' training produces.

Options
-------
prune_decay : float
    ``gamma`` in (0, 1]; 1.0 (default) disables pruning.
prune_threshold : float
    Norm share of the trailing components below which a client prunes (default 0.05).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.algorithms.base import FederationContext, Options, Tensors, Update, register, weighted_mean
from fedlora.algorithms.zeropad import ZeroPad
from fedlora.errors import FedLoraError
from fedlora.lora import ModuleId, make_key


@dataclass
class HetLoraOptions(Options):
    prune_decay: float = 1.0
    prune_threshold: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_decay <= 1.0:
            raise FedLoraError(f"algorithm.prune_decay = {self.prune_decay}: use a value in (0, 1]; 1.0 disables")
        if not 0.0 <= self.prune_threshold < 1.0:
            raise FedLoraError(f"algorithm.prune_threshold = {self.prune_threshold}: use a value in [0, 1)")


def product_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """``||s B A||_F`` from ``r x r`` Gram matrices: ``||BA||_F^2 = tr((B^T B)(A A^T))``."""
    gram = (b.double().T @ b.double()) * (a.double() @ a.double().T)
    return abs(scaling) * math.sqrt(max(float(gram.sum()), 0.0))


@register
class HetLora(ZeroPad):
    name = "hetlora"
    description = "HetLoRA: zero-padded ranks, aggregation weighted by update norms, optional rank self-pruning"
    paper = "arXiv 2401.06432"
    options_class = HetLoraOptions
    options: HetLoraOptions  # type: ignore[assignment]

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.ranks: dict[int, int] = dict(ctx.ranks)
        self.weight_history: dict[str, dict[str, float]] = {}

    def client_rank(self, client: int) -> int:
        return self.ranks[client]

    def norm_weights(self, updates: Mapping[int, Update], module_id: ModuleId) -> dict[int, float]:
        """``p_k ~ ||s_k B_k A_k||_F`` on one module, normalized over the round's participants."""
        key_a, key_b = make_key(module_id, "lora", "A"), make_key(module_id, "lora", "B")
        norms = {
            c: product_norm(u.tensors[key_a], u.tensors[key_b], self.ctx.alpha / u.tensors[key_a].shape[0])
            for c, u in updates.items()
        }
        total = sum(norms.values())
        if total == 0.0:
            return {c: 1.0 / len(norms) for c in norms}
        return {c: n / total for c, n in norms.items()}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        padded = self.padded(updates)
        new_lora: Tensors = {}
        mean_weights = dict.fromkeys(updates, 0.0)
        for mid in self.ctx.module_ids:
            keys = (make_key(mid, "lora", "A"), make_key(mid, "lora", "B"))
            weights = self.norm_weights(updates, mid)
            new_lora.update(weighted_mean({c: {k: t[k] for k in keys} for c, t in padded.items()}, weights))
            for c, w in weights.items():
                mean_weights[c] += w / len(self.ctx.module_ids)
        self.global_lora = new_lora
        self.weight_history[str(rnd)] = {str(c): w for c, w in sorted(mean_weights.items())}
        if self.options.prune_decay < 1.0:
            for c, u in updates.items():
                self.ranks[c] = self.pruned_rank(u, self.ranks[c])

    def pruned_rank(self, update: Update, rank: int) -> int:
        """The client's rank after self-pruning (unchanged unless its tail carries little norm)."""
        keep = max(1, math.ceil(self.options.prune_decay * rank))
        if keep >= rank:
            return rank
        scaling = self.ctx.alpha / rank
        full = tail = 0.0
        for mid in self.ctx.module_ids:
            a = update.tensors[make_key(mid, "lora", "A")]
            b = update.tensors[make_key(mid, "lora", "B")]
            full += product_norm(a, b, scaling)
            tail += product_norm(a[keep:], b[:, keep:], scaling)
        return keep if full > 0.0 and tail / full < self.options.prune_threshold else rank

    def structure(self) -> dict[str, Any]:
        return {
            "ranks": {str(c): r for c, r in self.ctx.ranks.items()},
            "pruned_ranks": {str(c): r for c, r in self.ranks.items()},
            "weights": self.weight_history,
        }

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, _ = super().state_dict()
        return tensors, {"ranks": {str(c): r for c, r in self.ranks.items()}, "weights": self.weight_history}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.ranks = {int(c): int(r) for c, r in meta["ranks"].items()}
        self.weight_history = dict(meta["weights"])
