"""Our LoRA: adapter slots on frozen linears, and the one state-dict boundary.

Laid out as peft's ``tuners/lora``: one file per concern, the public names re-exported here.

- :mod:`fedlora.lora.layout`: tensor keys, slots, module and model layouts (what trains,
  how slots mix, the mixing rule's own tensors), the seeded initial tensors.
- :mod:`fedlora.lora.layer`: :class:`LoRALinear`, the frozen linear plus its slots.
- :mod:`fedlora.lora.model`: :class:`LoraModel`, LoRA injected into a Hugging Face model,
  and the state-dict boundary (:meth:`LoraModel.read`, :meth:`LoraModel.load`).
- :mod:`fedlora.lora.peft_io`: mixed slots written as one LoRA, peft adapter directories.

Nothing outside this package touches adapter parameters by name: algorithms and runtimes
move tensors through :meth:`LoraModel.read` and :meth:`LoraModel.load`.
"""

from __future__ import annotations

from fedlora.lora.layer import LoRALinear
from fedlora.lora.layout import (
    BASE_SLOT,
    HEAD_PREFIX,
    MIX_SLOT,
    ROUTER_SLOT,
    Layout,
    LoraKey,
    Mixing,
    ModuleId,
    ModuleLayout,
    SlotSpec,
    init_factors,
    init_state,
    make_key,
    parse_key,
)
from fedlora.lora.model import LoraModel, num_bytes
from fedlora.lora.peft_io import PeftAdapter, adapter_from_slots, load_peft, save_peft

__all__ = [
    "BASE_SLOT",
    "HEAD_PREFIX",
    "MIX_SLOT",
    "ROUTER_SLOT",
    "Layout",
    "LoRALinear",
    "LoraKey",
    "LoraModel",
    "Mixing",
    "ModuleId",
    "ModuleLayout",
    "PeftAdapter",
    "SlotSpec",
    "adapter_from_slots",
    "init_factors",
    "init_state",
    "load_peft",
    "make_key",
    "num_bytes",
    "parse_key",
    "save_peft",
]
