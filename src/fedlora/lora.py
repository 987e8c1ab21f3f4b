"""Our LoRA layer with adapter slots, and the one state-dict boundary.

A wrapped linear (:class:`LoRALinear`) holds the frozen base weight and an ordered set of
**slots**. Each slot is a pair ``A: r x d_in``, ``B: d_out x r`` with its own rank and
scaling ``s = alpha / r``. How the slots combine is the module's **mixing rule**:

``sum``
    ``h = W x + sum_i w_i s_i B_i A_i x`` with fixed weights ``w_i`` (default 1), or with
    per-example weights set for evaluation by :meth:`LoraModel.set_instance_weights`.
``lambda``
    Two slots (first and second): ``h = W x + lam s_1 B_1 A_1 x + (1 - lam) s_2 B_2 A_2 x``
    with ``lam = sigmoid(theta)``, one learnable scalar per module (FedTreeLoRA). With a
    single slot ``lam`` is fixed at 1.
``router``
    A token router ``Linear(d_in -> n_slots)`` + softmax weights the slots per token
    (FedALT, FedLEASE).

Every tensor an algorithm reads or writes has a stable key, parsed once into a
:class:`LoraKey` ``(layer, module, slot, factor)``::

    layers.3.value.cluster.A     slot factors A and B
    layers.3.value.mix.theta     the lambda logit of a module
    layers.3.value.router.weight the router (and router.bias)
    layers.3.value.base.dW       a dense update folded into the frozen base weight
    head.weight                  the classification head (see ``fedlora.heads``)

Nothing outside this module touches adapter parameters by name: algorithms and runtimes
move tensors through :meth:`LoraModel.read` and :meth:`LoraModel.load`.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from fedlora.errors import FedLoraError
from fedlora.quant import QuantizedLinear

Mixing = Literal["sum", "lambda", "router"]

MIX_SLOT = "mix"
ROUTER_SLOT = "router"
BASE_SLOT = "base"
HEAD_PREFIX = "head."
_SPECIAL_SLOTS = frozenset({MIX_SLOT, ROUTER_SLOT, BASE_SLOT})
_KEY_RE = re.compile(r"^layers\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
# Where the layer index sits in a Hugging Face module path (BERT: encoder.layer.3,
# Llama: model.layers.3, GPT-2: h.3, T5: block.3).
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)(?:\.|$)")


class ModuleId(NamedTuple):
    """One adapted linear: its transformer layer (0 = shallowest) and module name."""

    layer: int
    module: str

    def prefix(self) -> str:
        return f"layers.{self.layer}.{self.module}"


class LoraKey(NamedTuple):
    """A parsed adapter tensor key ``layers.<layer>.<module>.<slot>.<factor>``."""

    layer: int
    module: str
    slot: str
    factor: str

    @property
    def module_id(self) -> ModuleId:
        return ModuleId(self.layer, self.module)

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.module}.{self.slot}.{self.factor}"


@lru_cache(maxsize=65536)
def parse_key(key: str) -> LoraKey:
    """Parse an adapter key; raise :class:`FedLoraError` on anything else."""
    match = _KEY_RE.match(key)
    if match is None:
        raise FedLoraError(f"'{key}' is not an adapter key; expected layers.<layer>.<module>.<slot>.<factor>")
    return LoraKey(int(match[1]), match[2], match[3], match[4])


def make_key(module_id: ModuleId, slot: str, factor: str) -> str:
    return f"layers.{module_id.layer}.{module_id.module}.{slot}.{factor}"


@dataclass(frozen=True)
class SlotSpec:
    """One adapter slot of a module: its rank, alpha and which factors train."""

    name: str
    rank: int
    alpha: float
    train_a: bool = True
    train_b: bool = True
    weight: float = 1.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModuleLayout:
    """The slots of one adapted module and how they mix."""

    slots: tuple[SlotSpec, ...]
    mixing: Mixing = "sum"
    train_mix: bool = True
    folded: bool = False

    def __post_init__(self) -> None:
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate slot names {names}")
        if any(n in _SPECIAL_SLOTS for n in names):
            raise ValueError(f"slot names {sorted(_SPECIAL_SLOTS)} are reserved")
        if self.mixing == "lambda" and not 1 <= len(self.slots) <= 2:
            raise ValueError("lambda mixing takes one or two slots")
        if self.mixing == "router" and not self.slots:
            raise ValueError("router mixing needs at least one slot")


@dataclass(frozen=True)
class Layout:
    """The adapter layout of a whole model: one :class:`ModuleLayout` per module."""

    modules: Mapping[ModuleId, ModuleLayout]

    @staticmethod
    def uniform(module_ids: Iterable[ModuleId], module_layout: ModuleLayout) -> Layout:
        return Layout({mid: module_layout for mid in module_ids})

    def to_json(self) -> dict[str, Any]:
        return {
            mid.prefix(): {
                "slots": [asdict(s) for s in ml.slots],
                "mixing": ml.mixing,
                "train_mix": ml.train_mix,
                "folded": ml.folded,
            }
            for mid, ml in self.modules.items()
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Layout:
        modules: dict[ModuleId, ModuleLayout] = {}
        for prefix, ml in data.items():
            _, layer, module = prefix.split(".", 2)
            modules[ModuleId(int(layer), module)] = ModuleLayout(
                slots=tuple(SlotSpec(**s) for s in ml["slots"]),
                mixing=ml["mixing"],
                train_mix=ml["train_mix"],
                folded=ml["folded"],
            )
        return Layout(modules)

    def trainable_keys(self) -> list[str]:
        """Keys of every tensor a client trains under this layout."""
        keys: list[str] = []
        for mid, ml in self.modules.items():
            for s in ml.slots:
                if s.train_a:
                    keys.append(make_key(mid, s.name, "A"))
                if s.train_b:
                    keys.append(make_key(mid, s.name, "B"))
            if ml.train_mix and ml.mixing == "lambda" and len(ml.slots) == 2:
                keys.append(make_key(mid, MIX_SLOT, "theta"))
            if ml.train_mix and ml.mixing == "router":
                keys.append(make_key(mid, ROUTER_SLOT, "weight"))
                keys.append(make_key(mid, ROUTER_SLOT, "bias"))
        return keys


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def init_factors(
    module_id: ModuleId, slot: str, rank: int, d_in: int, d_out: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard LoRA init, the same on every client for the same seed.

    ``A`` is Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear`` and peft), i.e.
    ``U(-1/sqrt(d_in), 1/sqrt(d_in))``; ``B`` is zero. Rows of ``A`` are drawn in order,
    so a rank-4 init is the first four rows of the rank-8 init (nested ranks).
    """
    generator = torch.Generator().manual_seed(_stable_seed(seed, module_id.layer, module_id.module, slot))
    bound = 1.0 / math.sqrt(d_in)
    a = (torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(d_out, rank)


def init_state(
    layout: Layout, shapes: Mapping[ModuleId, tuple[int, int]], seed: int, theta0: float = 0.0
) -> dict[str, torch.Tensor]:
    """Seeded initial tensors for every slot, mixing scalar and router of a layout."""
    state: dict[str, torch.Tensor] = {}
    for mid, ml in layout.modules.items():
        d_out, d_in = shapes[mid]
        for s in ml.slots:
            a, b = init_factors(mid, s.name, s.rank, d_in, d_out, seed)
            state[make_key(mid, s.name, "A")] = a
            state[make_key(mid, s.name, "B")] = b
        if ml.mixing == "lambda" and len(ml.slots) == 2:
            state[make_key(mid, MIX_SLOT, "theta")] = torch.tensor(theta0)
        if ml.mixing == "router":
            state[make_key(mid, ROUTER_SLOT, "weight")] = torch.zeros(len(ml.slots), d_in)
            state[make_key(mid, ROUTER_SLOT, "bias")] = torch.zeros(len(ml.slots))
    return state


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


def _module_id_for(path: str, name: str) -> ModuleId | None:
    match = _LAYER_RE.search(path)
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
            if ml.mixing == "lambda" and len(ml.slots) == 2:
                self._params[make_key(mid, MIX_SLOT, "theta")] = module.theta
            if ml.mixing == "router":
                self._params[make_key(mid, ROUTER_SLOT, "weight")] = module.router.weight
                self._params[make_key(mid, ROUTER_SLOT, "bias")] = module.router.bias
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
            if m.layout.mixing == "lambda" and len(m.layout.slots) == 2
        }


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for a dict of tensors (payload only, no framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- peft interchange ----------------------------------------------------------------
@dataclass
class PeftAdapter:
    """One LoRA per module in peft's format: ranks, alphas and factors."""

    a: dict[ModuleId, torch.Tensor]
    b: dict[ModuleId, torch.Tensor]
    alpha: dict[ModuleId, float]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def rank(self, mid: ModuleId) -> int:
        return int(self.a[mid].shape[0])


def adapter_from_slots(
    tensors: Mapping[str, torch.Tensor], layout: Layout, lambdas: Mapping[str, float]
) -> PeftAdapter:
    """Write a module's mixed slots as one LoRA (exact for ``sum`` and ``lambda`` mixing).

    Slots combined with fixed weights ``w_i`` and scalings ``s_i`` are one LoRA of rank
    ``sum r_i``: ``B = [w_1 s_1 B_1, ..., w_n s_n B_n] / s``, ``A = [A_1; ...; A_n]`` with
    ``s = alpha / rank`` of the exported adapter (``alpha = rank`` so ``s = 1``). With
    ``lambda`` mixing the weights are ``(lam, 1 - lam)``. Router mixing depends on the input
    and is not a LoRA: export a merged model instead.
    """
    a_out: dict[ModuleId, torch.Tensor] = {}
    b_out: dict[ModuleId, torch.Tensor] = {}
    alpha_out: dict[ModuleId, float] = {}
    for mid, ml in layout.modules.items():
        if not ml.slots:
            continue
        if ml.mixing == "router":
            raise FedLoraError("router-mixed adapters are input-dependent and cannot be exported as a LoRA")
        if ml.mixing == "lambda" and len(ml.slots) == 2:
            lam = lambdas[mid.prefix()]
            weights = [lam, 1.0 - lam]
        elif ml.mixing == "lambda":
            weights = [1.0]
        else:
            weights = [s.weight for s in ml.slots]
        a_parts = [tensors[make_key(mid, s.name, "A")] for s in ml.slots]
        b_parts = [
            tensors[make_key(mid, s.name, "B")] * (w * s.scaling) for s, w in zip(ml.slots, weights, strict=True)
        ]
        a_cat = torch.cat(a_parts, dim=0)
        a_out[mid] = a_cat
        b_out[mid] = torch.cat(b_parts, dim=1)
        alpha_out[mid] = float(a_cat.shape[0])
    return PeftAdapter(a_out, b_out, alpha_out)


def save_peft(
    adapter: PeftAdapter,
    out_dir: Path,
    *,
    paths: Mapping[ModuleId, str],
    base_model: str,
    task_type: str,
    modules_to_save: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft reads them.

    ``modules_to_save`` maps a sub-module path (e.g. ``classifier``) to its full weights,
    for parts of the model that are not LoRA but differ from the base checkpoint (a
    seeded classification head).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {paths[mid]: adapter.rank(mid) for mid in adapter.a}
    alphas = {paths[mid]: adapter.alpha[mid] for mid in adapter.a}
    default_rank = max(ranks.values())
    default_alpha = next(iter(alphas.values()))
    tensors: dict[str, torch.Tensor] = {}
    for mid in adapter.a:
        prefix = f"base_model.model.{paths[mid]}"
        tensors[f"{prefix}.lora_A.weight"] = adapter.a[mid].contiguous()
        tensors[f"{prefix}.lora_B.weight"] = adapter.b[mid].contiguous()
    for module_path, state in (modules_to_save or {}).items():
        for name, value in state.items():
            tensors[f"base_model.model.{module_path}.{name}"] = value.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": default_rank,
        "lora_alpha": default_alpha,
        "rank_pattern": {p: r for p, r in ranks.items() if r != default_rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != default_alpha},
        "target_modules": sorted({mid.module for mid in adapter.a}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def load_peft(adapter_dir: Path, paths: Mapping[ModuleId, str]) -> PeftAdapter:
    """Read a peft LoRA adapter directory back into per-module factors."""
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FedLoraError(f"{adapter_dir} is not a peft adapter (adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise FedLoraError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    tensors = load_file(str(weights_file))
    by_path = {p: mid for mid, p in paths.items()}
    a: dict[ModuleId, torch.Tensor] = {}
    b: dict[ModuleId, torch.Tensor] = {}
    alpha: dict[ModuleId, float] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        for factor, store in ((".lora_A.weight", a), (".lora_B.weight", b)):
            if name.endswith(factor):
                path = name[: -len(factor)]
                if path not in by_path:
                    raise FedLoraError(f"{weights_file}: adapter for {path}, which this model does not adapt")
                store[by_path[path]] = value
                break
        else:
            extra[name] = value
    for mid in a:
        path = paths[mid]
        alpha[mid] = float(config.get("alpha_pattern", {}).get(path, config["lora_alpha"]))
    return PeftAdapter(a, b, alpha, extra)
