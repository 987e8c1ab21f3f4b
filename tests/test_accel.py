"""Device, precision, quantized base, activation checkpointing and memory figures (all on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedlora.accel import autocast, model_bytes, prepare_model, resolve_device
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.lora import Layout, LoraModel, ModuleLayout, SlotSpec, init_state
from fedlora.models import load_model
from fedlora.quant import QuantizedLinear
from fedlora.simulation import Simulation

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")
CPU = torch.device("cpu")


def _run(tmp_path: Path, name: str, *overrides: str, config: str = SMOKE) -> dict[str, Any]:
    out = tmp_path / name
    args = ["run", config, "--out", str(out), "--quiet"]
    for text in overrides:
        args += ["--set", text]
    assert main(args) == 0
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_cuda_is_one_clear_error_and_exit_2(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FedLoraError, match="no CUDA GPU is available"):
        resolve_device(name)
    code = main(["run", SMOKE, "--out", str(tmp_path / "r"), "--quiet", "--set", f"run.device='{name}'"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is available" in err and "Traceback" not in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message of a machine without MPS")
def test_absent_mps_is_refused() -> None:
    with pytest.raises(FedLoraError, match="no MPS device"):
        resolve_device("mps")


def test_auto_and_cpu_resolve_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "tpu"])
def test_device_spelling_checked_by_the_config(bad: str) -> None:
    with pytest.raises(FedLoraError, match=r"run\.device"):
        load_config(None, [f"run.device='{bad}'"])


def test_outputs_leave_the_model_on_the_cpu(tmp_path: Path) -> None:
    summary = _run(tmp_path, "auto", "run.device='auto'", "run.rounds=1")
    assert summary["device"] == str(resolve_device("auto"))
    sim = Simulation(load_config(tmp_path / "auto" / "config.toml"), tmp_path / "auto")
    sim.restore()
    payload = sim.fed.algorithm.global_payload()
    assert payload is not None
    sim.fed.runner.load(payload, {}, {})
    read = sim.fed.lora_model.read(sim.fed.lora_model.all_keys())
    assert {t.device.type for t in read.values()} == {"cpu"}


# --------------------------------------------------------------------------- precision


def _frozen_base_bytes(lm: LoraModel) -> int:
    """Bytes of the frozen base's parameters: all but the LoRA modules' own and the head's."""
    own = {id(p) for m in lm.modules.values() for n, p in m.named_parameters() if not n.startswith("base.")}
    own |= {id(p) for p in lm.head.parameters()} if lm.head is not None else set()
    return sum(p.numel() * p.element_size() for p in lm.model.parameters() if id(p) not in own)


def test_bf16_halves_the_base_and_keeps_trainables_fp32() -> None:
    fp32 = prepare_model(load_model("tiny-bert", task="classification", num_labels=2), ["query", "value"], device=CPU)
    bf16 = prepare_model(
        load_model("tiny-bert", task="classification", num_labels=2), ["query", "value"], device=CPU, precision="bf16"
    )
    assert _frozen_base_bytes(bf16) * 2 == _frozen_base_bytes(fp32)
    # The whole model (fp32 head, int64 position buffers included) is just over half.
    ratio = model_bytes(bf16.model) / model_bytes(fp32.model)
    assert 0.5 <= ratio < 0.51
    layout = Layout.uniform(bf16.module_ids, ModuleLayout(slots=(SlotSpec("lora", 4, 8.0),)))
    bf16.apply_layout(layout)
    assert {p.dtype for _, p in bf16.parameters_for(bf16.all_keys())} == {torch.float32}
    assert bf16.modules[bf16.module_ids[0]].base.weight.dtype == torch.bfloat16


def test_bf16_run_is_close_to_fp32(tmp_path: Path) -> None:
    """Tolerance: final train loss within 0.02, personalized accuracy within 1/16 (one test example)."""
    steps = ("train.local_steps=4", "run.rounds=3")
    fp32 = _run(tmp_path, "fp32", *steps)
    bf16 = _run(tmp_path, "bf16", *steps, "train.precision='bf16'")
    assert bf16["precision"] == "bf16"
    assert abs(bf16["final"]["train_loss"] - fp32["final"]["train_loss"]) < 0.02
    assert abs(bf16["final"]["personalized_acc_mean"] - fp32["final"]["personalized_acc_mean"]) <= 1 / 16 + 1e-9


def test_fp16_runs_with_a_loss_scaler(tmp_path: Path) -> None:
    summary = _run(tmp_path, "fp16", "train.precision='fp16'", "run.rounds=1")
    assert np.isfinite(summary["final"]["train_loss"])


def test_unknown_precision_and_quantization_are_refused() -> None:
    with pytest.raises(FedLoraError, match=r"train\.precision"):
        load_config(None, ["train.precision='fp8'"])
    with pytest.raises(FedLoraError, match=r"model\.quantization"):
        load_config(None, ["model.quantization='nf2'"])


# --------------------------------------------------------------------------- activation checkpointing


def _lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    loaded = load_model("tiny-bert", task="classification", num_labels=2)
    lm = prepare_model(loaded, ["query", "value"], device=CPU, gradient_checkpointing=checkpointing)
    layout = Layout.uniform(lm.module_ids, ModuleLayout(slots=(SlotSpec("lora", 4, 8.0),)))
    lm.apply_layout(layout)
    state = init_state(layout, lm.shapes, seed=3)
    state = {k: v + 0.05 if k.endswith(".B") else v for k, v in state.items()}  # B != 0: A gets gradients too
    lm.load(state)
    for _, p in lm.parameters_for(lm.all_keys()):
        p.requires_grad_(True)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 6659, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    lm.model.train()
    torch.manual_seed(0)  # the same dropout masks in both models (checkpointing replays the RNG state)
    logits = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    return {k: p.grad.clone() for k, p in lm.parameters_for(lm.all_keys()) if p.grad is not None}


def test_activation_checkpointing_gives_equal_gradients() -> None:
    plain = _lora_grads(False)
    checkpointed = _lora_grads(True)
    assert set(plain) == set(checkpointed) and any(k.endswith(".A") for k in plain)
    for key in plain:
        assert plain[key].abs().sum() > 0
        assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- quantization


def test_int8_dequantizes_to_row_absmax_steps() -> None:
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.1, 0.2, -0.4]])
    layer = QuantizedLinear(_linear(weight), "int8", CPU)
    # Row scale = absmax / 127; each weight becomes round(w / scale) * scale.
    expected = torch.stack([torch.round(row / (row.abs().max() / 127)) * (row.abs().max() / 127) for row in weight])
    assert layer.packed.dtype == torch.int8
    assert_close(layer.dequantized(torch.float32), expected, rtol=0, atol=1e-6)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def test_nf4_codebook_values_roundtrip_exactly_and_pack_two_per_byte() -> None:
    # NF4's 16 levels (QLoRA, Appendix E) scaled by each block's absmax are representable exactly.
    levels = torch.tensor(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0]
    )  # fmt: skip
    # Blocks are 64 consecutive weights: one row each here, with its own absmax.
    weight = torch.stack([levels.repeat(4) * 0.5, levels.repeat(4) * 2.0, levels.flip(0).repeat(4) * 0.25,
                          levels.repeat(4) * 1.5])  # fmt: skip
    layer = QuantizedLinear(_linear(weight), "nf4", CPU)
    assert layer.packed.numel() == weight.numel() // 2 and layer.packed.dtype == torch.uint8
    assert_close(layer.dequantized(torch.float32), weight, rtol=0, atol=1e-6)


def test_quantized_linear_forward_and_input_gradient_use_the_dequantized_weight() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 64), torch.randn(8)
    layer = QuantizedLinear(_linear(weight, bias), "nf4", CPU)
    w_hat = layer.dequantized(torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    out = layer(x)
    assert_close(out, x @ w_hat.T + bias)
    (out * torch.arange(8.0)).sum().backward()
    assert x.grad is not None
    assert_close(x.grad, (torch.arange(8.0).expand(3, 8)) @ w_hat)
    with autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16


def test_nf4_base_is_smaller_and_frozen_linears_only() -> None:
    plain = prepare_model(load_model("tiny-llama", task="causal_lm"), ["q_proj", "v_proj"], device=CPU)
    loaded = load_model("tiny-llama", task="causal_lm")
    nf4 = prepare_model(loaded, ["q_proj", "v_proj"], device=CPU, quantization="nf4")
    quantized = [p for p, m in nf4.model.named_modules() if isinstance(m, QuantizedLinear)]
    # 2 layers x 7 linears (q, k, v, o, gate, up, down); lm_head (tied to the embeddings) stays.
    assert len(quantized) == 14 and not any(p.startswith("lm_head") for p in quantized)
    assert all(isinstance(nf4.modules[mid].base, QuantizedLinear) for mid in nf4.module_ids)
    linear_bytes = sum(m.num_weights * 4 for m in nf4.model.modules() if isinstance(m, QuantizedLinear))
    packed = sum(
        m.packed.numel() + m.absmax.numel() * 4 + m.code.numel() * 4
        for m in nf4.model.modules()
        if isinstance(m, QuantizedLinear)
    )
    assert model_bytes(plain.model) - model_bytes(nf4.model) == linear_bytes - packed
    assert nf4.base_param_count() == plain.base_param_count()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_tiny_llama_trains_exports_and_merges(tmp_path: Path, scheme: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = str(ROOT / "configs" / "nlg_smoke.toml")
    summary = _run(tmp_path, "run", f"model.quantization='{scheme}'", "run.rounds=1", config=config)
    assert summary["quantization"] == scheme and np.isfinite(summary["final"]["train_loss"])
    run = tmp_path / "run"
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    sim = Simulation(load_config(run / "config.toml"), run)
    sim.restore()
    payload = sim.fed.algorithm.global_payload()
    assert payload is not None
    sim.fed.runner.load(payload, {}, {})
    batch = sim.fed.corpus.batch(sim.fed.test_union[:4])
    with torch.no_grad():
        ours = sim.fed.lora_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
        theirs = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # The adapter loads with peft on the plain base (the dequantized base is the merged model's).
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(sim.fed.loaded.source), str(tmp_path / "adapter")
        )
        assert (
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.shape == ours.shape
        )
    assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_folding_algorithm_keeps_its_dense_update_beside_a_quantized_base(tmp_path: Path) -> None:
    summary = _run(tmp_path, "fedex", "algorithm.name='fedex'", "model.quantization='int8'", "run.rounds=2")
    assert np.isfinite(summary["final"]["global_acc"])
    sim = Simulation(load_config(tmp_path / "fedex" / "config.toml"), tmp_path / "fedex")
    sim.restore()
    payload = sim.fed.algorithm.global_payload()
    assert payload is not None
    sim.fed.runner.load(payload, {}, sim.fed.head.payload())
    module = sim.fed.lora_model.modules[sim.fed.lora_model.module_ids[0]]
    assert isinstance(module.base, QuantizedLinear) and module.folded_update is not None
    assert module.folded_update.abs().sum() > 0  # FedEx folded the residual of two rounds' averaging
    x = torch.randn(2, module.in_features)
    with torch.no_grad():
        expected = (
            module.base(x)
            + x @ module.folded_update.T
            + sum(module._slot_out(x, spec) * spec.weight for spec in module.layout.slots)
        )
        assert_close(module(x), expected)


# --------------------------------------------------------------------------- memory figures


def test_memory_figures_in_rows_summary_and_compare(tmp_path: Path) -> None:
    summary = _run(tmp_path, "mem", "run.rounds=2")
    rows = [json.loads(line) for line in (tmp_path / "mem" / "metrics.jsonl").read_text().splitlines()]
    aggregates = [r for r in rows if r["client"] is None]
    assert all(r["peak_rss_bytes"] > 50 * 2**20 for r in aggregates)  # a process holding torch: > 50 MiB
    assert summary["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in aggregates)
    expected_accel = None if summary["device"] == "cpu" else summary["peak_accel_bytes"]
    assert summary["peak_accel_bytes"] == expected_accel
    out = tmp_path / "cmp"
    assert main(["compare", SMOKE, "--algorithms", "fedit", "--out", str(out), "--set", "run.rounds=1"]) == 0
    table = (out / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| algorithm"))
    row = next(line for line in table.splitlines() if line.startswith("| fedit"))
    assert header.endswith("| peak RSS | peak accel. mem |")
    assert row.split("|")[-3].strip().endswith("MB")


# --------------------------------------------------------------------------- accelerator suite


def test_accelerator_suite_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("accelerator_suite", ROOT / "benchmarks" / "accelerator_suite.py")
    assert spec is not None and spec.loader is not None
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| fedtreelora | cpu | bf16 | none |" in printed
    data = json.loads((tmp_path / "accelerator_suite.json").read_text())
    assert data["dry_run"] and set(data["comparison"]) == {"local", "fedit", "fedtreelora"}
    tree = data["summaries"]["fedtreelora"]
    assert tree["rounds"] == 2 and tree["precision"] == "bf16" and tree["peak_rss_bytes"] > 0
