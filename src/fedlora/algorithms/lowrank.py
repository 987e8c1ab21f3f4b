"""Shared machinery of the heterogeneous-rank family: dense server updates and their truncations.

FlexLoRA, FLoRA and FedHL keep one dense update ``dW`` (fp32, ``d_out x d_in``) per
adapted module on the server; their global model is ``W0 + dW`` (a folded layout with
the key ``layers.<l>.<m>.base.dW``). FlexLoRA and FedHL hand client ``k`` the rank-``r_k``
truncation of ``dW`` as LoRA factors, from one top-``r_max`` SVD per module and round
(truncations are nested, so one SVD serves every rank).

This module registers no algorithm; it holds what those algorithms share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedlora.algorithms.base import Algorithm, FederationContext, Options, Payload, Tensors, Update
from fedlora.lora import BASE_SLOT, Layout, ModuleId, ModuleLayout, SlotSpec, init_factors, make_key

SvdMethod = Literal["auto", "full", "lowrank"]

#: Modules with both sides at most this use ``torch.linalg.svd``; larger ones ``torch.svd_lowrank``.
FULL_SVD_MAX_SIDE = 1024
#: Extra random directions of the randomized SVD, and its power iterations (torch.svd_lowrank's default).
LOWRANK_OVERSAMPLE = 10
LOWRANK_POWER_ITERATIONS = 2
#: A singular value at most this fraction of the largest counts as zero (its direction is noise).
ZERO_SINGULAR_RTOL = 1e-6


@dataclass
class TopSvd:
    """The leading ``k`` singular triplets of a matrix: ``M ~ U diag(S) V^T``."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def top_svd(matrix: torch.Tensor, k: int, *, method: SvdMethod = "auto", seed: int = 0) -> TopSvd:
    """Top-``k`` singular triplets of ``matrix`` (fp32).

    ``method="auto"`` takes the exact ``torch.linalg.svd`` when both sides are at most
    :data:`FULL_SVD_MAX_SIDE` (or ``k`` is close to the smaller side) and the randomized
    ``torch.svd_lowrank`` otherwise, seeded so that the result is deterministic
    without touching the global RNG.
    """
    d_out, d_in = matrix.shape
    k = min(k, d_out, d_in)
    q = min(k + LOWRANK_OVERSAMPLE, d_out, d_in)
    if method == "auto":
        small = max(d_out, d_in) <= FULL_SVD_MAX_SIDE or q >= min(d_out, d_in)
        method = "full" if small else "lowrank"
    if method == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return TopSvd(u[:, :k], s[:k], vh[:k].T)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=LOWRANK_POWER_ITERATIONS)
    return TopSvd(u[:, :k], s[:k], v[:, :k])


def nonzero_components(s: torch.Tensor) -> torch.Tensor:
    """Mask of singular values that are not numerically zero."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > s[0] * ZERO_SINGULAR_RTOL


def truncation_factors(
    svd: TopSvd, rank: int, scaling: float, init_a: torch.Tensor, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the rank-``rank`` truncation: ``B = U_r S_r / s``, ``A = V_r^T``.

    Components whose singular value is zero (all of them while ``dW = 0``), and ranks past
    the matrix's smaller side, take the standard LoRA init instead (``A`` row from
    ``init_a``, ``B`` column zero), so their gradients do not vanish.
    """
    a = init_a.clone()
    b = torch.zeros(d_out, rank)
    k = min(rank, svd.s.numel())
    live = torch.nonzero(nonzero_components(svd.s[:k])).flatten()
    a[live] = svd.v[:, live].T
    b[:, live] = svd.u[:, live] * (svd.s[live] / scaling)
    return a, b


def truncation_error(svd: TopSvd, total_energy: float, rank: int) -> float:
    """``||dW - [dW]_r||_F^2 = ||dW||_F^2 - sum_{j <= r} sigma_j^2`` (never negative)."""
    kept = float((svd.s[:rank].double() ** 2).sum())
    return max(total_energy - kept, 0.0)


def lora_keys(module_id: ModuleId, slot: str = "lora") -> tuple[str, str]:
    return make_key(module_id, slot, "A"), make_key(module_id, slot, "B")


def delta_key(module_id: ModuleId) -> str:
    return make_key(module_id, BASE_SLOT, "dW")


def stacked_product(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(B_i, A_i)`` so that ``B_st @ A_st = sum_i c_i B_i A_i`` (one matmul, any ranks).

    ``B_st = [B_1 .. B_n]`` (``d_out x sum r_i``) and ``A_st = [c_1 A_1; ..; c_n A_n]``.
    """
    b_st = torch.cat([b.float() for b, _ in factors], dim=1)
    a_st = torch.cat([c * a.float() for (_, a), c in zip(factors, coefficients, strict=True)], dim=0)
    return b_st, a_st


class DenseUpdateAlgorithm(Algorithm):
    """Base of methods whose server state is a dense ``dW`` per module (global model ``W0 + dW``).

    Subclasses implement :meth:`configure` and :meth:`aggregate`; this class holds ``dW``,
    the per-rank layouts, the global payload, the SVD truncations and checkpointing.
    """

    mixed_ranks = True

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.delta: dict[ModuleId, torch.Tensor] = {
            mid: torch.zeros(d_out, d_in) for mid, (d_out, d_in) in ctx.module_shapes.items()
        }
        self.r_max = max(ctx.ranks.values())
        self._layouts: dict[tuple[int, bool], Layout] = {}
        self._global_layout = Layout.uniform(ctx.module_ids, ModuleLayout(slots=(), folded=True))

    # --- layouts and payloads ---------------------------------------------------------
    def rank_layout(self, rank: int, *, folded: bool = False) -> Layout:
        """One LoRA slot of ``rank`` on every module (cached: the same object per rank)."""
        key = (rank, folded)
        if key not in self._layouts:
            spec = SlotSpec("lora", rank, self.ctx.alpha)
            self._layouts[key] = Layout.uniform(self.ctx.module_ids, ModuleLayout(slots=(spec,), folded=folded))
        return self._layouts[key]

    def scaling(self, client: int) -> float:
        return self.ctx.alpha / self.ctx.ranks[client]

    def delta_tensors(self) -> Tensors:
        return {delta_key(mid): dw for mid, dw in self.delta.items()}

    def global_payload(self) -> Payload:
        return Payload(self._global_layout, self.delta_tensors())

    # --- truncations ------------------------------------------------------------------
    def svds(self, rnd: int) -> dict[ModuleId, TopSvd]:
        """One top-``r_max`` SVD of ``dW`` per module for round ``rnd``."""
        return {mid: top_svd(dw, self.r_max, seed=self.ctx.seed * 1_000_003 + rnd) for mid, dw in self.delta.items()}

    def truncation_payloads(self, svds: Mapping[ModuleId, TopSvd], clients: Sequence[int]) -> dict[int, Payload]:
        """Client ``k`` gets its rank-``r_k`` truncation of ``dW`` as LoRA factors."""
        # Nested init: the rank-r init is the first r rows of the rank-r_max one.
        init_a = {
            mid: init_factors(mid, "lora", self.r_max, d_in, d_out, self.ctx.seed)[0]
            for mid, (d_out, d_in) in self.ctx.module_shapes.items()
        }
        payloads: dict[int, Payload] = {}
        for c in clients:
            rank = self.ctx.ranks[c]
            tensors: Tensors = {}
            for mid, svd in svds.items():
                d_out = self.ctx.module_shapes[mid][0]
                a, b = truncation_factors(svd, rank, self.scaling(c), init_a[mid][:rank], d_out)
                key_a, key_b = lora_keys(mid)
                tensors[key_a], tensors[key_b] = a, b
            payloads[c] = Payload(self.rank_layout(rank), tensors)
        return payloads

    def client_factors(self, update: Update, module_id: ModuleId, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_k B_k, A_k)`` of one module from a client's upload."""
        key_a, key_b = lora_keys(module_id)
        return self.scaling(client) * update.tensors[key_b].float(), update.tensors[key_a].float()

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {k: v.clone() for k, v in self.delta_tensors().items()}, self.meta()

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        for mid in self.delta:
            self.delta[mid] = tensors[delta_key(mid)].clone()
        self.load_meta(meta)

    def meta(self) -> dict[str, Any]:
        """JSON-able server state besides ``dW`` (override with :meth:`load_meta`)."""
        return {}

    def load_meta(self, meta: dict[str, Any]) -> None:
        return None
