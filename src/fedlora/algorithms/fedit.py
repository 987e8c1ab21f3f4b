"""fedit: FedIT / FedAvg on LoRA factors.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning"
(arXiv 2305.05644). The server keeps one LoRA; each round ``A <- mean_w(A_k)`` and
``B <- mean_w(B_k)`` separately, with weights ``q_k = n_k / sum n`` over the round's
participants. The product of the means is not the mean of the products: that inexactness
is what FFA-LoRA and FedEx-LoRA address.

Options
-------
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

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
from fedlora.lora import init_state


@register
class FedIt(Algorithm):
    name = "fedit"
    description = "FedIT: FedAvg of the LoRA factors A and B separately"
    paper = "arXiv 2305.05644"
    options_class = WeightingOptions
    options: WeightingOptions
    #: Whether clients train A (FFA-LoRA freezes it at the shared seeded init).
    train_a: ClassVar[bool] = True

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.layout = self.lora_layout(train_a=self.train_a)
        trained = set(self.layout.trainable_keys())
        init = init_state(self.layout, ctx.module_shapes, ctx.seed)
        self.global_lora: Tensors = {k: v for k, v in init.items() if k in trained}

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: Payload(self.layout, self.global_lora) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        self.global_lora = self.client_mean({c: u.tensors for c, u in updates.items()})

    def global_payload(self) -> Payload:
        return Payload(self.layout, self.global_lora)

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self.global_lora), {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = dict(tensors)
