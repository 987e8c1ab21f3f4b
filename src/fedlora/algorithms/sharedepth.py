"""sharedepth: FedAvg on a chosen set of layers, the rest private (the FedTreeLoRA motivation experiment).

Paper: the motivation experiment of FedTreeLoRA (arXiv 2603.13282, ICML 2026). Clients train one
LoRA on every adapted module; the LoRA of the layers in the shared set is averaged
factor-wise over the round's participants as in FedIT (``A <- mean_w(A_k)``,
``B <- mean_w(B_k)``); the LoRA of every other layer never leaves the client. Sharing only
shallow layers against only deep layers shows the vertical heterogeneity of LoRA
updates; sweeping the depth ``d`` shows how far sharing should go for a given
heterogeneity. ``shallow:0`` (or ``deep:0``) is ``local``; ``shallow:L`` is ``fedit``.

Options
-------
share : ``"shallow:d"`` (layers ``0..d-1``, default ``"shallow:1"``) or ``"deep:d"`` (the last ``d`` layers)
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from fedlora.errors import FedLoraError
from fedlora.lora import init_state, parse_key


@dataclass
class ShareDepthOptions(WeightingOptions):
    share: str = "shallow:1"

    def __post_init__(self) -> None:
        super().__post_init__()
        side, _, depth = self.share.partition(":")
        if side not in ("shallow", "deep") or not depth.isdigit():
            raise FedLoraError(f"algorithm.share = {self.share!r}: use 'shallow:d' or 'deep:d' with d a layer count")

    @property
    def side(self) -> str:
        return self.share.partition(":")[0]

    @property
    def depth(self) -> int:
        return int(self.share.partition(":")[2])


def shared_layers(side: str, depth: int, num_layers: int) -> list[int]:
    """Layers ``0..depth-1`` (``shallow``) or the last ``depth`` layers (``deep``)."""
    if side == "shallow":
        return list(range(depth))
    return list(range(num_layers - depth, num_layers))


@register
class ShareDepth(Algorithm):
    name = "sharedepth"
    description = "FedIT on the shallowest (shallow:d) or deepest (deep:d) layers only, the rest private"
    paper = "arXiv 2603.13282 (motivation)"
    options_class = ShareDepthOptions
    options: ShareDepthOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        opts = self.options
        if opts.depth > ctx.num_layers:
            raise FedLoraError(
                f"algorithm.share = {opts.share!r}: the model has {ctx.num_layers} layers; use d in 0..{ctx.num_layers}"
            )
        self.layers = shared_layers(opts.side, opts.depth, ctx.num_layers)
        self.layout = self.lora_layout()
        shared = set(self.layers)
        trained = set(self.layout.trainable_keys())
        init = init_state(self.layout, ctx.module_shapes, ctx.seed)
        self.shared_lora: Tensors = {k: v for k, v in init.items() if k in trained and parse_key(k).layer in shared}
        self.upload = tuple(f"layers.{layer}.*" for layer in self.layers)

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: Payload(self.layout, self.shared_lora, upload=self.upload) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates or not self.layers:
            return
        self.shared_lora = self.client_mean({c: u.tensors for c, u in updates.items()})

    def global_payload(self) -> Payload | None:
        # Only when every layer is shared is there one model for all (then this is fedit).
        if len(self.layers) < self.ctx.num_layers:
            return None
        return Payload(self.layout, self.shared_lora)

    def structure(self) -> dict[str, Any]:
        return {"share": self.options.share, "shared_layers": self.layers}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self.shared_lora), {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.shared_lora = dict(tensors)
