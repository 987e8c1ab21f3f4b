"""fedsa: FedSA-LoRA, A shared and B private.

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning"
(arXiv 2410.01463). Every client trains a full LoRA; only ``A`` is uploaded and averaged
(``A <- mean_w(A_k)``), ``B`` never leaves the client. The paper's reading: ``A`` learns
general knowledge, ``B`` client-specific knowledge. A client's model is one LoRA (the
shared ``A`` and its own ``B``), so it exports to peft as is.

Options
-------
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
from fedlora.lora import init_state, parse_key


@register
class FedSa(Algorithm):
    name = "fedsa"
    description = "FedSA-LoRA: A averaged over all clients, B private"
    paper = "arXiv 2410.01463"
    options_class = WeightingOptions
    options: WeightingOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.layout = self.lora_layout()
        init = init_state(self.layout, ctx.module_shapes, ctx.seed)
        self.shared_a: Tensors = {k: v for k, v in init.items() if parse_key(k).factor == "A"}

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: Payload(self.layout, self.shared_a, upload=("*.A",)) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        self.shared_a = self.client_mean({c: u.tensors for c, u in updates.items()})

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self.shared_a), {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.shared_a = dict(tensors)
