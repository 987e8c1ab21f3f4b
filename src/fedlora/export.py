"""Export a run's result in peft format (``adapter_config.json`` + safetensors).

A client's personalized model is what it holds at the start of the next round: its
payload from the server (configured for the round after the last) with its private state
on top. The global model (``client=None``) is the algorithm's global payload. Mixed slots
are written as one LoRA exactly (see :func:`fedlora.lora.adapter_from_slots`); the
classification head is saved as a ``modules_to_save`` module so the export reproduces
the run's logits on a fresh base model.

With ``merged=True`` the model is written as a plain transformers checkpoint instead
(:func:`save_merged`): every adapted weight becomes ``W0 + dW + sum_i w_i s_i B_i A_i``.
That is the way out for methods that fold updates into the base weights (FedEx-LoRA,
FLoRA). Input-dependent mixing (routers, instance-wise weights) is neither a LoRA nor a
merged weight, and is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.lora import Layout, LoraModel, adapter_from_slots, save_peft


def merged_weights(lm: LoraModel, layout: Layout, lambdas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The dense weight of every adapted module with its folded update and its slots merged in.

    Keys are the modules' paths in the model plus ``.weight``. Raises
    :class:`FedLoraError` for router mixing, which depends on the input.
    """
    keys = [k for k in lm.all_keys() if k.startswith("layers.")]
    adapter = adapter_from_slots(lm.read(keys), layout, lambdas)
    out: dict[str, torch.Tensor] = {}
    for mid, module in lm.modules.items():
        weight = module.base.weight.detach().clone()
        if mid in adapter.a:
            scaling = adapter.alpha[mid] / adapter.rank(mid)
            weight += scaling * (adapter.b[mid] @ adapter.a[mid]).to(weight.dtype)
        out[f"{lm.paths[mid]}.weight"] = weight
    return out


def save_merged(
    lm: LoraModel,
    layout: Layout,
    lambdas: Mapping[str, float],
    *,
    source: str,
    task: str,
    num_labels: int,
    head_module: str | None,
    out_dir: Path,
) -> None:
    """Write the merged model (adapted weights and head) as a transformers checkpoint built from ``source``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    weights = merged_weights(lm, layout, lambdas)
    if lm.head is not None and head_module is not None:
        weights.update({f"{head_module}.{n}": p.detach() for n, p in lm.head.named_parameters()})
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))


def export_adapter(run_dir: Path, *, client: int | None, out_dir: Path, merged: bool = False) -> Path:
    """Write ``client``'s personalized adapter (or the global one) to ``out_dir``.

    ``merged=True`` writes a plain transformers model with the adapters merged in.
    """
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
    if payload.instance_weighting is not None:
        raise FedLoraError(
            f"{config.algorithm_name} weights its adapters per input at test time; that is neither a LoRA nor a "
            "merged model (for feddpa, run with algorithm.test_weighting='fixed' to export one)"
        )
    if merged:
        save_merged(
            lm,
            payload.layout,
            lm.lambdas(),
            source=fed.loaded.source,
            task=fed.loaded.task,
            num_labels=len(fed.dataset.label_names),
            head_module=fed.loaded.head_module,
            out_dir=out_dir,
        )
        return out_dir
    for mid, ml in payload.layout.modules.items():
        if ml.folded and torch.any(lm.modules[mid].folded_delta() != 0):
            raise FedLoraError(
                f"{config.algorithm_name} folds updates into the base weights; its result is not a LoRA adapter: "
                "export the merged model with --merged"
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
