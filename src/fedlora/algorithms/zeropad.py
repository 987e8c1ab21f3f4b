"""zeropad: naive heterogeneous-rank LoRA, zero-padded factor averaging.

The baseline the heterogeneous-rank papers compare against (called HeteroLoRA or
zero-padding in HetLoRA, arXiv 2401.06432, and FlexLoRA, arXiv 2402.11505). The server
keeps factors at rank ``r_max = max_k r_k`` (seeded standard init, nested: the first
``r`` rows of the rank-``r_max`` init are the rank-``r`` init). Client ``k`` gets the
first ``r_k`` rows of ``A`` and columns of ``B`` and trains them with scaling
``s_k = alpha / r_k``; uploads are zero-padded back to ``r_max`` and averaged factor-wise,
so components a client does not hold are pulled towards zero by its weight.

The global model is the rank-``r_max`` LoRA with scaling ``s = alpha / r_max``. A client
starts from the global model's own rank-``r_k`` truncation at that scaling: its ``B``
columns are multiplied by ``s / s_k = r_k / r_max`` on the way down and by
``r_max / r_k`` on the way up, so ``s_k B_k A_k = s B[:, :r_k] A[:r_k]`` exactly and an
upload enters the average as the client's own update. Without it a rank-2 client of a
rank-16 federation would start from 8x the global model's rank-2 part. **[choice]** The
FlexLoRA authors' HetLoRA baseline splits the same factor as a square root over ``A``
and ``B``; putting all of it on ``B`` gives the same products and keeps every client's
``A`` rows in the units of the shared seeded init (``B`` starts at zero).

Options
-------
weighting : "examples" (default, ``q_k = n_k / sum n`` over the round's participants) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

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
from fedlora.lora import Layout, ModuleLayout, SlotSpec, init_state, parse_key


def pad_factor(key: str, value: torch.Tensor, r_max: int) -> torch.Tensor:
    """Zero-pad a rank-r factor to rank ``r_max`` (rows of ``A``, columns of ``B``)."""
    factor = parse_key(key).factor
    if factor == "A":
        return F.pad(value.float(), (0, 0, 0, r_max - value.shape[0]))
    return F.pad(value.float(), (0, r_max - value.shape[1]))


def truncate_factor(key: str, value: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` components of a factor (rows of ``A``, columns of ``B``)."""
    return value[:rank] if parse_key(key).factor == "A" else value[:, :rank]


def to_client(key: str, value: torch.Tensor, rank: int, r_max: int) -> torch.Tensor:
    """A global factor (scaling ``alpha / r_max``) as the rank-``rank`` client's start (``alpha / rank``).

    The first ``rank`` components, ``B`` times ``rank / r_max``: ``s_k B_k A_k = s B_r A_r``.
    """
    value = truncate_factor(key, value, rank)
    return value * (rank / r_max) if parse_key(key).factor == "B" else value


def to_global(key: str, value: torch.Tensor, r_max: int) -> torch.Tensor:
    """A client's uploaded factor at the global scaling (``B`` times ``r_max / r_k``), padded to ``r_max``."""
    if parse_key(key).factor == "B":
        value = value.float() * (r_max / value.shape[1])
    return pad_factor(key, value, r_max)


@register
class ZeroPad(Algorithm):
    name = "zeropad"
    description = "zero-padding: server factors at r_max, clients take the leading r_k, padded factor-wise mean"
    options_class: ClassVar[type[Options]] = WeightingOptions
    options: WeightingOptions
    mixed_ranks = True

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.r_max = max(ctx.ranks.values())
        self._layouts: dict[int, Layout] = {}
        layout = self.layout(self.r_max)
        init = init_state(layout, ctx.module_shapes, ctx.seed)
        self.global_lora: Tensors = {k: init[k] for k in layout.trainable_keys()}

    def layout(self, rank: int) -> Layout:
        if rank not in self._layouts:
            spec = SlotSpec("lora", rank, self.ctx.alpha)
            self._layouts[rank] = Layout.uniform(self.ctx.module_ids, ModuleLayout(slots=(spec,)))
        return self._layouts[rank]

    def client_rank(self, client: int) -> int:
        return self.ctx.ranks[client]

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        payloads: dict[int, Payload] = {}
        for c in clients:
            rank = self.client_rank(c)
            tensors = {k: to_client(k, v, rank, self.r_max) for k, v in self.global_lora.items()}
            payloads[c] = Payload(self.layout(rank), tensors)
        return payloads

    def padded(self, updates: Mapping[int, Update]) -> dict[int, Tensors]:
        """Uploads at the global scaling (``B`` times ``s_k / s``), zero-padded to ``r_max``."""
        return {c: {k: to_global(k, v, self.r_max) for k, v in u.tensors.items()} for c, u in updates.items()}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        self.global_lora = self.client_mean(self.padded(updates))

    def global_payload(self) -> Payload:
        return Payload(self.layout(self.r_max), self.global_lora)

    def structure(self) -> dict[str, Any]:
        return {"ranks": {str(c): r for c, r in self.ctx.ranks.items()}}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self.global_lora), {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = dict(tensors)
