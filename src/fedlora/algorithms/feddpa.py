"""feddpa: FedDPA, a global and a local adapter mixed per test instance.

Paper: Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models"
(arXiv 2403.19211, NeurIPS 2024). Every client holds two LoRAs on each adapted module: a
*global* one, trained, uploaded and FedIT-averaged, and a *local* one that never leaves
the client. The module computes

    h = W0 x + (1 - w) s B_g A_g x + w s B_l A_l x

Training uses the fixed weight ``w = local_weight`` and trains both adapters together
**[choice]**. At test time the weight is instance-wise **[choice]**: ``w(x) = (1 +
cos(e(x), e_train)) / 2``, the cosine similarity of the input's pooled representation (its
token embeddings from the frozen embedding layer, averaged) to the mean representation of
the client's training set, mapped to [0, 1]; inputs that look like the client's own data
lean on the local adapter. With ``test_weighting = "fixed"`` the test weight is
``local_weight`` too, and a client's model is exactly one LoRA of rank 2r (peft export).

The global model (evaluated on the union of test splits) is the global adapter alone.
``structure`` records the mean and spread over clients of the test-time local weight per
round (each client reports its mean weight with its update).

Options
-------
test_weighting : "instance" (default) or "fixed"
local_weight : float in [0, 1], default 0.5: the local adapter's training weight (and test weight when fixed)
weighting : "examples" (default) or "uniform": FedIT weights of the global adapter
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fedlora.algorithms.base import (
    Algorithm,
    ClientHooks,
    FederationContext,
    Options,
    Payload,
    Tensors,
    Update,
    WeightingOptions,
    register,
)
from fedlora.errors import FedLoraError
from fedlora.lora import Layout, ModuleLayout, SlotSpec, init_state

GLOBAL = "global"
LOCAL = "local"


@dataclass
class FedDpaOptions(WeightingOptions):
    test_weighting: str = "instance"
    local_weight: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_weighting not in ("instance", "fixed"):
            raise FedLoraError(f"algorithm.test_weighting = {self.test_weighting!r}: use 'instance' or 'fixed'")
        if not 0.0 <= self.local_weight <= 1.0:
            raise FedLoraError(f"algorithm.local_weight = {self.local_weight}: use a weight in [0, 1]")


class SimilarityWeighting(ClientHooks):
    """FedDPA's client: with the instruction ``{"test_weighting": "instance"}``, the local
    slot weight of each test input is ``(1 + cos(feature, reference)) / 2`` and the global
    slot gets the rest; otherwise the layout's fixed weights."""

    @property
    def weights_instances(self) -> bool:
        return self.instruction.get("test_weighting") == "instance"

    def slot_weights(self, features: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        local = (1.0 + F.cosine_similarity(features, reference.unsqueeze(0), dim=-1)) / 2.0
        return {LOCAL: local, GLOBAL: 1.0 - local}


@register
class FedDpa(Algorithm):
    name = "feddpa"
    description = "FedDPA: FedIT global adapter + private local adapter, mixed per test instance"
    paper = "arXiv 2403.19211"
    options_class = FedDpaOptions
    options: FedDpaOptions
    client_hooks = SimilarityWeighting

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        w = self.options.local_weight
        slots = (SlotSpec(GLOBAL, ctx.rank, ctx.alpha, weight=1.0 - w), SlotSpec(LOCAL, ctx.rank, ctx.alpha, weight=w))
        self.layout = Layout.uniform(ctx.module_ids, ModuleLayout(slots=slots))
        self.global_layout = self.lora_layout(slot=GLOBAL)
        init = init_state(self.global_layout, ctx.module_shapes, ctx.seed)
        self.global_lora: Tensors = {k: v for k, v in init.items() if k in set(self.global_layout.trainable_keys())}
        self.local_weight_per_round: list[dict[str, float]] = []

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {
            c: Payload(
                self.layout,
                self.global_lora,
                upload=(f"*.{GLOBAL}.*",),
                instruction={"test_weighting": self.options.test_weighting},
            )
            for c in clients
        }

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        self.global_lora = self.client_mean({c: u.tensors for c, u in updates.items()})
        reported = [u.metrics[f"weight_{LOCAL}"] for u in updates.values() if f"weight_{LOCAL}" in u.metrics]
        if reported:
            self.local_weight_per_round.append(
                {
                    "round": rnd,
                    "mean": statistics.mean(reported),
                    "std": statistics.pstdev(reported),
                    "min": min(reported),
                    "max": max(reported),
                }
            )

    def global_payload(self) -> Payload:
        return Payload(self.global_layout, self.global_lora)

    def structure(self) -> dict[str, Any]:
        return {
            "test_weighting": self.options.test_weighting,
            "train_local_weight": self.options.local_weight,
            "test_local_weight_per_round": self.local_weight_per_round,
        }

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self.global_lora), {"local_weight_per_round": self.local_weight_per_round}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = dict(tensors)
        self.local_weight_per_round = list(meta["local_weight_per_round"])
