"""peft interchange: mixed slots written as one LoRA; peft adapter directories written and read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.errors import FedLoraError
from fedlora.lora.layout import Layout, ModuleId, make_key


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
