"""fedex: FedEx-LoRA, exact aggregation by folding the residual into the frozen base.

Paper: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models" (arXiv 2410.09432). The server averages ``A`` and ``B``
as FedIT, and adds the residual

    dW += s * (mean_w(B_k A_k) - B_bar A_bar)        (d_out x d_in per module)

to the frozen base weight of every client, so that ``W0 + dW + s B_bar A_bar`` is exactly
``W0 + dW_prev + s mean_w(B_k A_k)``: the average of the products, not the product of the
averages. Clients hold ``W0 + dW`` as their frozen weight (payload key
``layers.<l>.<m>.base.dW``).

Bytes: a client already holds the base it was last sent, so the wire carries the averaged
factors plus one dense ``d_out x d_in`` matrix per module whenever residuals were added
since the client was last served (all pending residuals sum into one matrix).

Options
-------
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.algorithms.base import (
    Algorithm,
    FederationContext,
    Options,
    Payload,
    Tensors,
    Update,
    WeightingOptions,
    register,
    weighted_mean,
)
from fedlora.lora import BASE_SLOT, Layout, ModuleLayout, SlotSpec, init_state, make_key, num_bytes

SLOT = "lora"


@register
class FedEx(Algorithm):
    name = "fedex"
    description = "FedEx-LoRA: FedIT plus the exact-average residual folded into the frozen base weight"
    paper = "arXiv 2410.09432"
    options_class = WeightingOptions
    options: WeightingOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        spec = SlotSpec(SLOT, ctx.rank, ctx.alpha)
        self.scaling = spec.scaling
        self.layout = Layout.uniform(ctx.module_ids, ModuleLayout(slots=(spec,), folded=True))
        init = init_state(self.layout, ctx.module_shapes, ctx.seed)
        self.global_lora: Tensors = {k: v for k, v in init.items() if k in set(self.layout.trainable_keys())}
        self.base_delta: Tensors = {
            make_key(mid, BASE_SLOT, "dW"): torch.zeros(d_out, d_in) for mid, (d_out, d_in) in ctx.module_shapes.items()
        }
        #: Residuals folded so far, and how many of them each client's base already holds.
        self.residuals = 0
        self.received: dict[int, int] = {}
        self.residual_norms: list[float] = []

    def _payload(self) -> Payload:
        return Payload(self.layout, {**self.global_lora, **self.base_delta})

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        factor_bytes = num_bytes(self.global_lora)
        dense_bytes = num_bytes(self.base_delta)
        payloads: dict[int, Payload] = {}
        for c in clients:
            pending = self.received.get(c, 0) < self.residuals
            payload = self._payload()
            payload.wire_bytes = factor_bytes + (dense_bytes if pending else 0)
            payloads[c] = payload
        return payloads

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        weights = self.weights(list(updates), self.options.weighting)
        uploads = {c: u.tensors for c, u in updates.items()}
        mean = weighted_mean(uploads, weights)
        # B: d_out x r, A: r x d_in, so every product is d_out x d_in like the weight.
        products = {
            c: {mid.prefix(): t[make_key(mid, SLOT, "B")] @ t[make_key(mid, SLOT, "A")] for mid in self.ctx.module_ids}
            for c, t in uploads.items()
        }
        mean_product = weighted_mean(products, weights)
        norm_sq = 0.0
        for mid in self.ctx.module_ids:
            a_bar, b_bar = mean[make_key(mid, SLOT, "A")], mean[make_key(mid, SLOT, "B")]
            residual = self.scaling * (mean_product[mid.prefix()] - b_bar @ a_bar)
            d_key = make_key(mid, BASE_SLOT, "dW")
            self.base_delta[d_key] = self.base_delta[d_key] + residual
            norm_sq += float(residual.pow(2).sum())
        self.global_lora = mean
        # The clients whose updates came back hold the base sent this round (configure only reads
        # this, so a retried round, or a client that failed, is charged the dense base again).
        self.received.update({c: self.residuals for c in updates})
        self.residuals += 1
        self.residual_norms.append(norm_sq**0.5)

    def global_payload(self) -> Payload:
        return self._payload()

    def structure(self) -> dict[str, Any]:
        return {"residual_fro_norm_per_round": self.residual_norms}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        meta = {
            "residuals": self.residuals,
            "received": {str(c): n for c, n in self.received.items()},
            "residual_norms": self.residual_norms,
        }
        return {**self.global_lora, **self.base_delta}, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = {k: v for k, v in tensors.items() if not k.endswith(f".{BASE_SLOT}.dW")}
        self.base_delta = {k: v for k, v in tensors.items() if k.endswith(f".{BASE_SLOT}.dW")}
        self.residuals = int(meta["residuals"])
        self.received = {int(c): int(n) for c, n in meta["received"].items()}
        self.residual_norms = [float(x) for x in meta["residual_norms"]]
