"""Adapter layouts and tensor keys: which slots a module has, how they mix, what trains.

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

:meth:`ModuleLayout.mixing_shapes` is the one place that says which tensors a mixing rule
adds (``theta`` for ``lambda`` of two slots, the router's weight and bias for ``router``):
the trainable keys, the seeded init, the model's parameter map, the expected upload
shapes and the reported lambdas all read it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import torch

from fedlora.errors import FedLoraError
from fedlora.seeds import derive_seed

Mixing = Literal["sum", "lambda", "router"]

MIX_SLOT = "mix"
ROUTER_SLOT = "router"
BASE_SLOT = "base"
HEAD_PREFIX = "head."
_SPECIAL_SLOTS = frozenset({MIX_SLOT, ROUTER_SLOT, BASE_SLOT})
_KEY_RE = re.compile(r"^layers\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
# Where the layer index sits in a Hugging Face module path (BERT: encoder.layer.3,
# Llama: model.layers.3, GPT-2: h.3, T5: block.3).
LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)(?:\.|$)")


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

    def mixing_shapes(self, d_in: int) -> dict[tuple[str, str], tuple[int, ...]]:
        """The mixing rule's own tensors, ``(slot, factor) -> shape``, for a module of input size ``d_in``.

        ``lambda`` over two slots has the scalar logit ``mix.theta``; ``router`` has the
        router's ``router.weight`` (slots x d_in) and ``router.bias``; ``sum`` and a
        single-slot ``lambda`` have none.
        """
        if self.mixing == "lambda" and len(self.slots) == 2:
            return {(MIX_SLOT, "theta"): ()}
        if self.mixing == "router":
            return {(ROUTER_SLOT, "weight"): (len(self.slots), d_in), (ROUTER_SLOT, "bias"): (len(self.slots),)}
        return {}


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
            if ml.train_mix:
                keys.extend(make_key(mid, slot, factor) for slot, factor in ml.mixing_shapes(d_in=0))
        return keys


def init_factors(
    module_id: ModuleId, slot: str, rank: int, d_in: int, d_out: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard LoRA init, the same on every client for the same seed.

    ``A`` is Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear`` and peft), i.e.
    ``U(-1/sqrt(d_in), 1/sqrt(d_in))``; ``B`` is zero. Rows of ``A`` are drawn in order,
    so a rank-4 init is the first four rows of the rank-8 init (nested ranks).
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, module_id.layer, module_id.module, slot))
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
        for (slot, factor), shape in ml.mixing_shapes(d_in).items():
            state[make_key(mid, slot, factor)] = torch.full(shape, float(theta0) if slot == MIX_SLOT else 0.0)
    return state
