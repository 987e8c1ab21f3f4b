"""Export a run's result: a peft LoRA adapter, a LoRA of a chosen rank, or merged weights.

A client's personalized model is what it holds at the start of the next round: its
payload from the server (configured for the round after the last) with its private state
on top. The global model (``client=None``) is the algorithm's global payload.

- :func:`export_adapter` writes peft's ``adapter_config.json`` + safetensors. Mixed slots
  are written as one LoRA exactly (see :func:`fedlora.lora.adapter_from_slots`). With
  ``rank=R`` the model's whole update per module (folded dense update plus slots) is
  written as its best rank-``R`` approximation (truncated SVD): the way to export methods
  whose result is a dense update (FedHL, FlexLoRA, FLoRA) as a LoRA.
- :func:`export_merged` writes the base model with every module's update merged into its
  weights (``save_pretrained``), loadable by transformers without peft.

The classification head is saved too (``modules_to_save`` in the adapter, in the weights
of the merged model), so an export reproduces the run's logits on a fresh base model.
Input-dependent mixing (routers, instance-wise weights) is neither a LoRA nor a merged
weight, and is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from fedlora.client import HOOK_STATE
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.lora import LoraModel, ModuleId, PeftAdapter, adapter_from_slots, save_peft
from fedlora.models import LoadedModel, load_model

if TYPE_CHECKING:
    from fedlora.algorithms import ClientHooks, Payload
    from fedlora.simulation import Simulation


@dataclass
class RestoredModel:
    """A run's model as restored by :func:`restore_model`, loaded into ``sim.fed.runner``."""

    sim: Simulation
    payload: Payload

    @property
    def algorithm(self) -> str:
        return self.sim.fed.config.algorithm_name

    @property
    def hooks(self) -> ClientHooks:
        """The algorithm's client hooks for the restored payload (its test-time behaviour)."""
        return self.sim.fed.algorithm.client_hooks(self.payload.instruction)


def restore_model(run_dir: Path, client: int | None) -> RestoredModel:
    """Restore the run (read only) and load ``client``'s model, or the global one, into its runner."""
    from fedlora.simulation import Simulation

    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        raise FedLoraError(f"{run_dir} has no config.toml: is it a fedlora run directory?")
    config = load_config(config_file)
    sim = Simulation(config, run_dir)
    sim.restore()
    fed = sim.fed
    if client is None:
        payload = fed.algorithm.global_payload()
        if payload is None:
            raise FedLoraError(
                f"{config.algorithm_name} has no global model; choose one client's model with --client K "
                f"(0..{len(fed.client_ids) - 1})"
            )
        private = {}
    else:
        if client not in fed.client_ids:
            raise FedLoraError(f"--client {client}: the run has clients 0..{len(fed.client_ids) - 1}")
        payload = fed.algorithm.configure(sim.next_round, [client])[client]
        # The model's private tensors; the hooks' state (``hook/...``) is not part of the model.
        private = {k: v for k, v in sim.store.get(client).items() if not k.startswith(HOOK_STATE)}
    fed.runner.load(payload, private, fed.head.payload())
    return RestoredModel(sim, payload)


def _load_result(run_dir: Path, client: int | None) -> tuple[LoadedModel, LoraModel, str]:
    """Restore the model to export; refuse input-dependent mixing, which no export can hold."""
    restored = restore_model(run_dir, client)
    if restored.hooks.weights_instances:
        raise FedLoraError(
            f"{restored.algorithm} weights its adapters per input at test time; that is neither a LoRA nor a "
            "merged model (for feddpa, run with algorithm.test_weighting='fixed' to export one)"
        )
    fed = restored.sim.fed
    return fed.loaded, fed.lora_model, restored.algorithm


def _slot_adapter(lm: LoraModel) -> PeftAdapter:
    keys = [k for k in lm.all_keys() if k.startswith("layers.")]
    return adapter_from_slots(lm.read(keys), lm.layout, lm.lambdas())


def dense_updates(lm: LoraModel) -> dict[ModuleId, torch.Tensor]:
    """Each module's whole update ``W - W0`` (``d_out x d_in``): folded update plus its slots."""
    slots = _slot_adapter(lm)
    out: dict[ModuleId, torch.Tensor] = {}
    for mid, module in lm.modules.items():
        delta = module.folded_delta().float().clone()
        if mid in slots.a:
            delta += (slots.alpha[mid] / slots.rank(mid)) * slots.b[mid].float() @ slots.a[mid].float()
        out[mid] = delta
    return out


def _head(loaded: LoadedModel, lm: LoraModel) -> dict[str, dict[str, torch.Tensor]]:
    if loaded.head_module is None or lm.head is None:
        return {}
    return {loaded.head_module: {n: p.detach().clone() for n, p in lm.head.named_parameters()}}


def _task_type(loaded: LoadedModel) -> str:
    return "SEQ_CLS" if loaded.task == "classification" else "CAUSAL_LM"


def export_adapter(run_dir: Path, *, client: int | None, out_dir: Path, rank: int | None = None) -> Path:
    """Write ``client``'s personalized adapter (or the global one) to ``out_dir``.

    Parameters
    ----------
    rank
        None: the slots as they are (exact; the run must not fold updates into the base
        weights). An integer ``R``: every module's whole update as its best rank-``R``
        approximation (exact where the update's rank is at most ``R``).
    """
    loaded, lm, algorithm = _load_result(run_dir, client)
    if rank is None:
        if any(torch.any(m.folded_delta() != 0) for m in lm.modules.values()):
            raise FedLoraError(
                f"{algorithm} folds updates into the base weights; export a LoRA of a chosen rank with --rank R, "
                "or the merged model with --merged"
            )
        adapter = _slot_adapter(lm)
    else:
        if rank < 1:
            raise FedLoraError(f"--rank {rank}: the rank must be >= 1")
        adapter = low_rank_adapter(dense_updates(lm), rank)
    save_peft(
        adapter,
        out_dir,
        paths=lm.paths,
        base_model=loaded.source,
        task_type=_task_type(loaded),
        modules_to_save=_head(loaded, lm),
    )
    return out_dir


def low_rank_adapter(updates: dict[ModuleId, torch.Tensor], rank: int) -> PeftAdapter:
    """Best rank-``rank`` LoRA of each dense update: ``B = U_r S_r``, ``A = V_r^T``, alpha = r (s = 1)."""
    a: dict[ModuleId, torch.Tensor] = {}
    b: dict[ModuleId, torch.Tensor] = {}
    alpha: dict[ModuleId, float] = {}
    for mid, delta in updates.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        a[mid] = vh[:r].contiguous()
        b[mid] = (u[:, :r] * s[:r]).contiguous()
        alpha[mid] = float(r)
    return PeftAdapter(a, b, alpha)


def _pretrained(loaded: LoadedModel) -> PreTrainedModel:
    if not isinstance(loaded.model, PreTrainedModel):
        raise FedLoraError(f"{loaded.source}: not a transformers model, cannot save it with save_pretrained")
    return loaded.model


def export_merged(run_dir: Path, *, client: int | None, out_dir: Path) -> Path:
    """Write the base model with the run's update merged into its weights (``save_pretrained``)."""
    loaded, lm, _ = _load_result(run_dir, client)
    updates = dense_updates(lm)
    heads = _head(loaded, lm)
    config = load_config(run_dir / "config.toml")
    num_labels = _pretrained(loaded).config.num_labels if loaded.task == "classification" else None
    fresh = load_model(config.model.name, task=loaded.task, num_labels=num_labels, head_seed=config.run.seed)
    with torch.no_grad():
        for mid, delta in updates.items():
            linear = fresh.model.get_submodule(lm.paths[mid])
            if not isinstance(linear, nn.Linear):
                raise FedLoraError(f"{lm.paths[mid]} is not a linear module in the reloaded base model")
            linear.weight.add_(delta.to(linear.weight.dtype))
        for module_path, state in heads.items():
            params = dict(fresh.model.get_submodule(module_path).named_parameters())
            for name, value in state.items():
                params[name].copy_(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    _pretrained(fresh).save_pretrained(str(out_dir))
    fresh.tokenizer.save_pretrained(str(out_dir))
    return out_dir
