"""LoRA injected into a model (:class:`LoraModel`), and the one state-dict boundary its
:meth:`~LoraModel.read` and :meth:`~LoraModel.load` are."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from fedlora.errors import FedLoraError
from fedlora.lora.layer import LoRALinear
from fedlora.lora.layout import (
    BASE_SLOT,
    HEAD_PREFIX,
    LAYER_RE,
    MIX_SLOT,
    Layout,
    ModuleId,
    ModuleLayout,
    make_key,
    parse_key,
)
from fedlora.quant import QuantizedLinear


def _module_id_for(path: str, name: str) -> ModuleId | None:
    match = LAYER_RE.search(path)
    if match is None:
        return None
    return ModuleId(int(match[1]), name)


class LoraModel:
    """A Hugging Face model with :class:`LoRALinear` injected into its target modules.

    Parameters
    ----------
    model
        The transformer (sequence classification or causal LM). Its own weights are frozen.
    target_modules
        Names of the linear sub-modules to adapt (the last component of their path, e.g.
        ``query``/``value`` for BERT, ``q_proj``/``v_proj`` for Llama).
    head_module
        Name of the classification head sub-module (``classifier`` or ``score``), or None.
    dropout
        Dropout probability on every adapter's input while training (0 disables it).
    """

    def __init__(
        self, model: nn.Module, target_modules: Iterable[str], head_module: str | None, dropout: float = 0.0
    ) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        targets = set(target_modules)
        self.modules: dict[ModuleId, LoRALinear] = {}
        paths: dict[ModuleId, str] = {}
        for path, module in list(model.named_modules()):
            name = path.rsplit(".", 1)[-1]
            if name not in targets or not isinstance(module, nn.Linear):
                continue
            mid = _module_id_for(path, name)
            if mid is None:
                continue
            if mid in self.modules:
                raise FedLoraError(f"two modules map to {mid.prefix()}: {paths[mid]} and {path}")
            wrapped = LoRALinear(module, mid, dropout)
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            setattr(parent, name, wrapped)
            self.modules[mid] = wrapped
            paths[mid] = path
        missing = targets - {mid.module for mid in self.modules}
        if missing or not self.modules:
            found = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise FedLoraError(
                f"target modules {sorted(missing or targets)} not found in the model; its linear modules are {found}"
            )
        self.module_ids: list[ModuleId] = sorted(self.modules)
        self.paths = paths
        self.num_layers = 1 + max(mid.layer for mid in self.module_ids)
        self.shapes: dict[ModuleId, tuple[int, int]] = {
            mid: (m.out_features, m.in_features) for mid, m in self.modules.items()
        }
        self.head: nn.Module | None = model.get_submodule(head_module) if head_module else None
        self._layout: Layout | None = None
        self._params: dict[str, torch.Tensor] = {}

    def base_param_count(self) -> int:
        """Parameters of the pretrained model, adapters excluded (independent of any layout)."""
        adapter = {id(p) for m in self.modules.values() for n, p in m.named_parameters() if not n.startswith("base.")}
        quantized = sum(m.num_weights for m in self.model.modules() if isinstance(m, QuantizedLinear))
        return quantized + sum(p.numel() for p in self.model.parameters() if id(p) not in adapter)

    # --- layout -----------------------------------------------------------------------

    def apply_layout(self, layout: Layout) -> None:
        """Give every module its slots; modules absent from ``layout`` get none."""
        if layout is self._layout:
            return
        unknown = set(layout.modules) - set(self.modules)
        if unknown:
            raise FedLoraError(f"layout names modules the model does not adapt: {sorted(unknown)[:5]}")
        empty = ModuleLayout(slots=())
        for mid, module in self.modules.items():
            module.set_layout(layout.modules.get(mid, empty))
        self._layout = layout
        self._params = {}
        for mid, module in self.modules.items():
            ml = module.layout
            for s in ml.slots:
                self._params[make_key(mid, s.name, "A")] = module.factors[f"{s.name}_A"]
                self._params[make_key(mid, s.name, "B")] = module.factors[f"{s.name}_B"]
            for (slot, factor), param in module.mixing_parameters().items():
                self._params[make_key(mid, slot, factor)] = param
        if self.head is not None:
            for name, p in self.head.named_parameters():
                self._params[HEAD_PREFIX + name] = p

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise RuntimeError("apply_layout() first")
        return self._layout

    def parameters_for(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self._params[key]

    # --- the state-dict boundary ------------------------------------------------------
    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the model; every key must exist with the right shape."""
        problems: list[str] = []
        with torch.no_grad():
            for key, value in tensors.items():
                if key.endswith(f".{BASE_SLOT}.dW"):
                    self.modules[parse_key(key).module_id].fold(value)
                    continue
                param = self._params.get(key)
                if param is None:
                    problems.append(f"unknown key {key}")
                elif tuple(param.shape) != tuple(value.shape):
                    problems.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                else:
                    param.copy_(value)
        if problems:
            raise FedLoraError("cannot load adapter tensors: " + "; ".join(problems[:5]))

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the named tensors (``*.base.dW`` reads the folded update).

        Whatever device the model is on, what leaves it is on the CPU: the server side
        (aggregation, checkpoints, the wire) only ever sees CPU tensors.
        """
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key.endswith(f".{BASE_SLOT}.dW"):
                out[key] = self.modules[parse_key(key).module_id].folded_delta().to("cpu", copy=True)
            else:
                out[key] = self._params[key].detach().to("cpu", copy=True)
        return out

    def all_keys(self) -> list[str]:
        return list(self._params)

    def set_instance_weights(self, weights: Mapping[str, torch.Tensor] | None) -> None:
        """Weight the named slots of ``sum``-mixed modules per example (``(batch,)`` tensors); None resets."""
        for module in self.modules.values():
            module.instance_weights = weights

    def set_head_trainable(self, trainable: bool) -> None:
        if self.head is not None:
            for p in self.head.parameters():
                p.requires_grad_(trainable)

    def head_state(self) -> dict[str, torch.Tensor]:
        if self.head is None:
            return {}
        return {HEAD_PREFIX + n: p.detach().to("cpu", copy=True) for n, p in self.head.named_parameters()}

    def lambdas(self) -> dict[str, float]:
        """The current lambda of every module that mixes two slots by a learnable scalar."""
        return {
            mid.prefix(): float(m.lam().detach())
            for mid, m in self.modules.items()
            if (MIX_SLOT, "theta") in m.layout.mixing_shapes(m.in_features)
        }


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for a dict of tensors (payload only, no framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
