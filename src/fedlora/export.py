"""Export a run's result in peft format (``adapter_config.json`` + safetensors).

A client's personalized model is what it holds at the start of the next round: its
payload from the server (configured for the round after the last) with its private state
on top. The global model (``client=None``) is the algorithm's global payload. Mixed slots
are written as one LoRA exactly (see :func:`fedlora.lora.adapter_from_slots`); the
classification head is saved as a ``modules_to_save`` module so the export reproduces
the run's logits on a fresh base model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.lora import adapter_from_slots, save_peft


def export_adapter(run_dir: Path, *, client: int | None, out_dir: Path) -> Path:
    """Write ``client``'s personalized adapter (or the global one) to ``out_dir``."""
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
                f"{config.algorithm_name} has no global model; export one client's model with --client K "
                f"(0..{len(fed.client_ids) - 1})"
            )
        private = {}
    else:
        if client not in fed.client_ids:
            raise FedLoraError(f"--client {client}: the run has clients 0..{len(fed.client_ids) - 1}")
        payload = fed.algorithm.configure(sim.next_round, [client])[client]
        private = sim.store.get(client)
    fed.runner.load(payload, private, fed.head.payload())
    lm = fed.lora_model
    for mid, ml in payload.layout.modules.items():
        if ml.folded and torch.any(lm.modules[mid].folded_delta() != 0):
            raise FedLoraError(
                f"{config.algorithm_name} folds updates into the base weights; its result is not a LoRA adapter"
            )
    keys = [k for k in lm.all_keys() if k.startswith("layers.")]
    adapter = adapter_from_slots(lm.read(keys), payload.layout, lm.lambdas())
    head_path = fed.loaded.head_module
    modules = {}
    if head_path is not None and lm.head is not None:
        modules[head_path] = {n: p.detach().clone() for n, p in lm.head.named_parameters()}
    save_peft(
        adapter,
        out_dir,
        paths=lm.paths,
        base_model=fed.loaded.source,
        task_type="SEQ_CLS" if fed.loaded.task == "classification" else "CAUSAL_LM",
        modules_to_save=modules,
    )
    return out_dir
