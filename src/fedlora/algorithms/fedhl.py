"""fedhl: FedHL, heterogeneous-rank LoRA on a full-rank server basis, without truncation bias.

Paper: "FedHL: Federated Learning for Heterogeneous Low-Rank Adaptation via Unbiased
Aggregation" (arXiv 2505.18494). No public code by the authors; this follows the
project's ALGORITHMS.md.

Server state: a dense fp32 update ``dW`` per adapted module, initially zero. Each round,
per module, one top-``r_max`` SVD of ``dW`` (``torch.linalg.svd`` for small modules,
``torch.svd_lowrank`` for large) serves every client: client ``k`` starts from the
rank-``r_k`` truncation ``[dW]_{r_k}`` (``B = U_r S_r / s_k``, ``A = V_r^T``; components
with a zero singular value take the standard LoRA init), trains plain LoRA and uploads
``(A_k, B_k)``. Its truncation error is ``e_k = sum_m sum_{j > r_k} sigma_j^2``. The
server applies the unbiased increment

    dW <- dW + sum_k p_k (s_k B_k A_k - [dW]_{r_k})

so a round in which no client moves leaves ``dW`` unchanged (FlexLoRA would shrink it to
the mean of truncations). The result is ``W0 + dW``.

Options
-------
weighting : str
    ``optimal`` (default): ``p_k ~ 1 / (e_k^2 + eps)`` with the scale-aware
    ``eps = mean_k e_k^2`` of the round (every weight stays above ``1 / (m (m + 1))`` for
    ``m`` participants, so it cannot collapse onto the highest rank);
    ``optimal_paper``: the same with ``eps = 1e-6`` as published (collapses within a few
    rounds when errors differ); ``uniform``; ``examples`` (``q_k = n_k / sum n``);
    ``optimal_examples``: ``p_k ~ q_k / (e_k^2 + eps)`` with the scale-aware eps.
    Weights are normalized over the round's participants; with all ``e_k = 0`` (round 0)
    the optimal variants are uniform (``optimal_examples``: ``q_k``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.algorithms.base import FederationContext, Options, Payload, Update, register
from fedlora.algorithms.lowrank import (
    DenseUpdateAlgorithm,
    TopSvd,
    nonzero_components,
    stacked_product,
    truncation_error,
)
from fedlora.errors import FedLoraError
from fedlora.lora import ModuleId

WEIGHTINGS = ("optimal", "optimal_paper", "uniform", "examples", "optimal_examples")
#: The published regularizer of the optimal weights.
PAPER_EPS = 1e-6


@dataclass
class FedHlOptions(Options):
    weighting: str = "optimal"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise FedLoraError(f"algorithm.weighting = {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")


def fedhl_weights(
    errors: Mapping[int, float], weighting: str, examples: Mapping[int, float] | None = None
) -> dict[int, float]:
    """FedHL aggregation weights ``p_k`` over the round's participants.

    Parameters
    ----------
    errors
        Truncation error ``e_k`` of each participant.
    weighting
        One of :data:`WEIGHTINGS` (see the module docstring).
    examples
        ``q_k`` (any positive scale) for ``examples`` and ``optimal_examples``.
    """
    clients = list(errors)
    if not clients:
        return {}
    if weighting == "uniform":
        raw = {c: 1.0 for c in clients}
    elif weighting == "examples":
        raw = {c: float(_need(examples)[c]) for c in clients}
    else:
        squared = {c: errors[c] ** 2 for c in clients}
        eps = PAPER_EPS if weighting == "optimal_paper" else sum(squared.values()) / len(clients)
        prior = _need(examples) if weighting == "optimal_examples" else {c: 1.0 for c in clients}
        if eps == 0.0:
            raw = {c: float(prior[c]) for c in clients}
        else:
            raw = {c: float(prior[c]) / (squared[c] + eps) for c in clients}
    total = sum(raw.values())
    return {c: v / total for c, v in raw.items()}


def _need(examples: Mapping[int, float] | None) -> Mapping[int, float]:
    if examples is None:
        raise ValueError("this weighting needs the clients' example counts")
    return examples


@register
class FedHl(DenseUpdateAlgorithm):
    name = "fedhl"
    description = "FedHL: full-rank server update, per-client rank truncation, unbiased increment, optimal weights"
    paper = "arXiv 2505.18494"
    options_class = FedHlOptions
    options: FedHlOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.round_svds: dict[ModuleId, TopSvd] = {}
        self.round_svd_number = -1
        self.weight_history: dict[str, dict[str, float]] = {}
        self.error_history: dict[str, dict[str, float]] = {}

    def _svds(self, rnd: int) -> dict[ModuleId, TopSvd]:
        if self.round_svd_number != rnd:
            self.round_svds = self.svds(rnd)
            self.round_svd_number = rnd
        return self.round_svds

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return self.truncation_payloads(self._svds(rnd), clients)

    def truncation_errors(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        """``e_k = sum_m (||dW_m||_F^2 - sum_{j <= r_k} sigma_j^2)`` for each client."""
        svds = self._svds(rnd)
        energy = {mid: float(torch.linalg.vector_norm(dw)) ** 2 for mid, dw in self.delta.items()}
        return {
            c: sum(truncation_error(svds[mid], energy[mid], self.ctx.ranks[c]) for mid in self.delta) for c in clients
        }

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        clients = sorted(updates)
        svds = self._svds(rnd)
        errors = self.truncation_errors(rnd, clients)
        weights = fedhl_weights(errors, self.options.weighting, self.ctx.num_examples)
        for mid, dw in self.delta.items():
            svd = svds[mid]
            # sum_k p_k [dW]_{r_k} = sum_j (sum_{k: r_k >= j} p_k) sigma_j u_j v_j^T (nested truncations).
            coverage = torch.tensor(
                [sum(weights[c] for c in clients if self.ctx.ranks[c] > j) for j in range(svd.s.numel())]
            )
            live = nonzero_components(svd.s).float()
            factors = [self.client_factors(updates[c], mid, c) for c in clients]
            factors.append((svd.u * (svd.s * coverage * live), svd.v.T))
            b_st, a_st = stacked_product(factors, [weights[c] for c in clients] + [-1.0])
            dw.addmm_(b_st, a_st)
        self.round_svd_number = -1
        self.weight_history[str(rnd)] = {str(c): weights[c] for c in clients}
        self.error_history[str(rnd)] = {str(c): errors[c] for c in clients}

    def structure(self) -> dict[str, Any]:
        return {
            "weighting": self.options.weighting,
            "ranks": {str(c): r for c, r in self.ctx.ranks.items()},
            "weights": self.weight_history,
            "truncation_errors": self.error_history,
        }

    def meta(self) -> dict[str, Any]:
        return {"weights": self.weight_history, "truncation_errors": self.error_history}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.weight_history = dict(meta["weights"])
        self.error_history = dict(meta["truncation_errors"])
