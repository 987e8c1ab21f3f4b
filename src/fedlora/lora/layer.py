"""The LoRA layer: a frozen linear plus adapter slots combined by a mixing rule."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from fedlora.errors import FedLoraError
from fedlora.lora.layout import MIX_SLOT, ROUTER_SLOT, ModuleId, ModuleLayout, SlotSpec
from fedlora.quant import QuantizedLinear


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus adapter slots combined by a mixing rule.

    ``base`` may later be replaced by a :class:`~fedlora.quant.QuantizedLinear` (a
    quantized frozen base); a dense update folded into it is then kept beside it
    (``folded_update``) instead of in its weight. Slot parameters are created on the device of
    the module and in fp32, whatever dtype the frozen base has.
    """

    w0: torch.Tensor | None
    folded_update: torch.Tensor | None

    def __init__(self, base: nn.Linear, module_id: ModuleId, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.module_id = module_id
        self.in_features = base.in_features
        self.out_features = base.out_features
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        # The unfolded weight, copied on the first fold only (most algorithms never fold).
        self.register_buffer("w0", None, persistent=False)
        self.register_buffer("folded_update", None, persistent=False)
        self.factors = nn.ParameterDict()
        self.theta = nn.Parameter(torch.zeros(()))
        self.router = nn.Linear(self.in_features, 1)
        self.layout = ModuleLayout(slots=())
        self._folded = False
        #: Per-example weights (batch,) replacing the fixed weights of named ``sum`` slots.
        self.instance_weights: Mapping[str, torch.Tensor] | None = None
        #: Dropout on the adapters' input (peft's ``lora_dropout``), active in training mode only;
        #: ``Identity`` at 0 so that the default draws nothing from the RNG.
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    def set_layout(self, layout: ModuleLayout) -> None:
        """Allocate (or resize) the slot parameters for ``layout``."""
        device = self.theta.device
        keep = {s.name for s in layout.slots}
        for name in list(self.factors.keys()):
            if name[:-2] not in keep:
                del self.factors[name]
        for s in layout.slots:
            for factor, shape in (("A", (s.rank, self.in_features)), ("B", (self.out_features, s.rank))):
                name = f"{s.name}_{factor}"
                if name not in self.factors or tuple(self.factors[name].shape) != shape:
                    self.factors[name] = nn.Parameter(torch.zeros(shape, device=device))
        if layout.mixing == "router" and self.router.out_features != len(layout.slots):
            self.router = nn.Linear(self.in_features, len(layout.slots), device=device)
        if not layout.folded and self._folded:
            if self.w0 is not None:
                self.base.weight.data.copy_(self.w0)
            self.folded_update = None
            self._folded = False
        self.layout = layout

    def fold(self, delta: torch.Tensor) -> None:
        """Set the frozen weight to ``W0 + delta`` (FedEx-LoRA, FLoRA, merged models)."""
        shape = (self.out_features, self.in_features)
        if tuple(delta.shape) != shape:
            raise FedLoraError(
                f"{self.module_id.prefix()}: dense update has shape {tuple(delta.shape)}, "
                f"the module's weight is {shape} (d_out x d_in)"
            )
        if isinstance(self.base, QuantizedLinear):
            self.folded_update = delta.to(self.theta.device, torch.float32, copy=True)
        else:
            if self.w0 is None:
                self.w0 = self.base.weight.detach().clone()
            torch.add(self.w0, delta.to(self.w0), out=self.base.weight.data)
        self._folded = True

    def folded_delta(self) -> torch.Tensor:
        """The dense update folded into the frozen weight (zeros when none is)."""
        if self.folded_update is not None:
            return self.folded_update
        if self.w0 is None:
            return torch.zeros(self.out_features, self.in_features, device=self.theta.device)
        return self.base.weight.detach() - self.w0

    def _slot_out(self, x: torch.Tensor, spec: SlotSpec) -> torch.Tensor:
        a = self.factors[f"{spec.name}_A"]
        b = self.factors[f"{spec.name}_B"]
        out: torch.Tensor = F.linear(F.linear(x, a), b) * spec.scaling
        return out

    def mixing_parameters(self) -> dict[tuple[str, str], torch.Tensor]:
        """The parameters of the layout's mixing tensors (see :meth:`ModuleLayout.mixing_shapes`)."""
        own = {(MIX_SLOT, "theta"): self.theta, (ROUTER_SLOT, "weight"): self.router.weight}
        own[(ROUTER_SLOT, "bias")] = self.router.bias
        return {key: own[key] for key in self.layout.mixing_shapes(self.in_features)}

    def lam(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.folded_update is not None:
            out = out + F.linear(x, self.folded_update.to(x.dtype))
        layout = self.layout
        slots = layout.slots
        if not slots:
            return out
        gate_input = x
        x = self.lora_dropout(x)
        if layout.mixing == "sum":
            per_example = self.instance_weights or {}
            for spec in slots:
                if spec.name in per_example:
                    weight = per_example[spec.name].view(-1, *([1] * (x.dim() - 1)))
                    out = out + self._slot_out(x, spec) * weight
                else:
                    out = out + self._slot_out(x, spec) * spec.weight
        elif layout.mixing == "lambda":
            if len(slots) == 1:
                return out + self._slot_out(x, slots[0])
            lam = self.lam()
            out = out + lam * self._slot_out(x, slots[0]) + (1 - lam) * self._slot_out(x, slots[1])
        else:
            gates = torch.softmax(self.router(gate_input), dim=-1)
            for i, spec in enumerate(slots):
                out = out + gates[..., i : i + 1] * self._slot_out(x, spec)
        return out
