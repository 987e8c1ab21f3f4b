"""fedalt: FedALT, a private local LoRA beside a frozen rest-of-world LoRA, mixed by a router.

Paper: "FedALT: Federated Fine-Tuning through Adaptive Local Training with
Rest-of-the-World LoRA" (arXiv 2503.11880, AAAI 2026). On each adapted module a client
holds its own *local* LoRA (trained; it keeps it across rounds) and a *rest-of-world*
(RoW) LoRA, the factor-wise mean of the other clients' local LoRAs (frozen). A token
router ``Linear(d_in -> 2)`` + softmax mixes the two; routers are averaged over all
participants. The local LoRA is not replaced by an average: the server only uses it to
build the others' RoW LoRAs.

Each round a client uploads its local LoRA and router. It downloads its RoW LoRA and the
averaged router; its own local LoRA is echoed back by the simulator's stateless
protocol but not counted (``Payload.wire_bytes``): the client already holds it.

``structure`` records per module the router's local share at a zero input
(``softmax(bias)[local]``) and the norm of the router weight.

Options
-------
weighting : "examples" (default) or "uniform": weights of the RoW means and the router average
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
)
from fedlora.errors import FedLoraError
from fedlora.lora import ROUTER_SLOT, Layout, ModuleLayout, SlotSpec, init_state, make_key, num_bytes, parse_key

LOCAL = "local"
WORLD = "world"


def rename_slot(tensors: Mapping[str, torch.Tensor], old: str, new: str) -> Tensors:
    """The same tensors under another slot name (``layers.0.query.old.A`` -> ``...new.A``)."""
    out: Tensors = {}
    for key, value in tensors.items():
        k = parse_key(key)
        out[make_key(k.module_id, new if k.slot == old else k.slot, k.factor)] = value
    return out


@register
class FedAlt(Algorithm):
    name = "fedalt"
    description = "FedALT: private local LoRA + frozen rest-of-world LoRA, mixed by a globally averaged router"
    paper = "arXiv 2503.11880"
    options_class = WeightingOptions
    options: WeightingOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        if len(ctx.client_ids) < 2:
            raise FedLoraError(f"{self.name} needs at least 2 clients (the rest of the world is the others)")
        slots = (SlotSpec(LOCAL, ctx.rank, ctx.alpha), SlotSpec(WORLD, ctx.rank, ctx.alpha, False, False))
        self.layout = Layout.uniform(ctx.module_ids, ModuleLayout(slots=slots, mixing="router"))
        init = init_state(self.layout, ctx.module_shapes, ctx.seed)
        local_init = {k: v for k, v in init.items() if parse_key(k).slot == LOCAL}
        #: Every client's latest local LoRA (the shared seeded init until it first uploads).
        self.local_lora: dict[int, Tensors] = {c: dict(local_init) for c in ctx.client_ids}
        self.router: Tensors = {k: v for k, v in init.items() if parse_key(k).slot == ROUTER_SLOT}

    def rest_of_world(self, client: int) -> Tensors:
        """Factor-wise mean of the other clients' local LoRAs, under the ``world`` slot."""
        others = [c for c in self.ctx.client_ids if c != client]
        mean = self.client_mean({c: self.local_lora[c] for c in others})
        return rename_slot(mean, LOCAL, WORLD)

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        payloads: dict[int, Payload] = {}
        for c in clients:
            world = self.rest_of_world(c)
            tensors = {**self.local_lora[c], **world, **self.router}
            payloads[c] = Payload(self.layout, tensors, wire_bytes=num_bytes(world) + num_bytes(self.router))
        return payloads

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        for c, u in updates.items():
            self.local_lora[c] = {k: v for k, v in u.tensors.items() if parse_key(k).slot == LOCAL}
        routers = {
            c: {k: v for k, v in u.tensors.items() if parse_key(k).slot == ROUTER_SLOT} for c, u in updates.items()
        }
        self.router = self.client_mean(routers)

    def structure(self) -> dict[str, Any]:
        local_share: dict[str, float] = {}
        weight_norm: dict[str, float] = {}
        for mid in self.ctx.module_ids:
            bias = self.router[make_key(mid, ROUTER_SLOT, "bias")]
            local_share[mid.prefix()] = float(torch.softmax(bias, dim=0)[0])
            weight_norm[mid.prefix()] = float(self.router[make_key(mid, ROUTER_SLOT, "weight")].norm())
        return {"router_local_share_at_zero_input": local_share, "router_weight_norm": weight_norm}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = {f"client{c}/{k}": v for c, t in self.local_lora.items() for k, v in t.items()}
        tensors.update(self.router)
        return tensors, {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.router = {k: v for k, v in tensors.items() if not k.startswith("client")}
        self.local_lora = {c: {} for c in self.ctx.client_ids}
        for key, value in tensors.items():
            if key.startswith("client"):
                client, name = key.removeprefix("client").split("/", 1)
                self.local_lora[int(client)][name] = value
