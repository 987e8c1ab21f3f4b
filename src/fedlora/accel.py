"""Where and how the one model computes: device, precision, quantized base, checkpointing, memory.

``run.device``
    ``"cpu"`` (default), ``"cuda"`` / ``"cuda:N"``, ``"mps"``, or ``"auto"`` (the first
    CUDA GPU, else MPS, else the CPU). The model, its adapters, the optimizer state and
    every batch live there. Tensors leave the model through :meth:`LoraModel.read
    <fedlora.lora.LoraModel.read>` as CPU copies, so aggregation, checkpoints and the
    Flower wire are on the CPU whatever device the clients trained on.
``train.precision``
    ``"fp32"``, ``"bf16"`` or ``"fp16"``: the frozen base is stored in that dtype, the
    trainable tensors (adapters, mixing scalars, routers, the head) and the optimizer state
    stay fp32, forwards run under :func:`torch.autocast`, and fp16 scales the loss with a
    :class:`torch.amp.GradScaler`.
``model.quantization``
    ``"nf4"`` / ``"int8"``: the frozen linear weights of the base are stored quantized
    (see :mod:`fedlora.quant`).
``train.gradient_checkpointing``
    Recompute each transformer block's activations in the backward pass instead of
    keeping them (transformers' gradient checkpointing, non-reentrant).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from fedlora.errors import FedLoraError
from fedlora.lora import LoraModel
from fedlora.models import LoadedModel
from fedlora.quant import dequantize_linears, quantize_linears

__all__ = [
    "MemoryMeter",
    "as_trained_base",
    "autocast",
    "compute_dtype",
    "grad_scaler",
    "prepare_model",
    "resolve_device",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``run.device`` names, checked to be present.

    Raises
    ------
    FedLoraError
        If the device is not on this machine (no CUDA build or GPU, a GPU index past the
        last one, no MPS) or the name is not one of the accepted forms.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise FedLoraError(
                "run.device = 'mps' but this machine has no MPS device; use run.device = 'auto' or 'cpu'"
            )
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if count == 0:
            raise FedLoraError(
                f"run.device = {name!r} but no CUDA GPU is available (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'}); use run.device = 'auto' or 'cpu'"
            )
        if index >= count:
            raise FedLoraError(
                f"run.device = {name!r} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    raise FedLoraError(f"run.device = {name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen base and of autocast for ``train.precision``."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        raise FedLoraError(f"train.precision = {precision!r}: use one of {', '.join(DTYPES)}")
    return dtype


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Autocast to the compute dtype on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler that is active for fp16 only (for fp32 and bf16 its calls pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _head_paths(model: nn.Module) -> list[str]:
    """Children of ``model`` outside its base model: the task heads (classifier, score, lm_head)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return [name for name, child in model.named_children() if child is not base]


def _under_any(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _cast_base(model: nn.Module, dtype: torch.dtype, heads: list[str]) -> None:
    """Store the model in ``dtype`` except its heads (fp32: they may train; a tied weight stays fp32)."""
    if dtype == torch.float32:
        return
    model.to(dtype)
    for head in heads:
        model.get_submodule(head).float()


def prepare_model(
    loaded: LoadedModel,
    target_modules: list[str],
    *,
    device: torch.device,
    precision: str = "fp32",
    quantization: str = "none",
    gradient_checkpointing: bool = False,
    lora_dropout: float = 0.0,
) -> LoraModel:
    """Inject LoRA into ``loaded.model`` and place it for training.

    Order: cast the base to the compute dtype (heads stay fp32: they may train), inject
    the LoRA modules (fp32), quantize the frozen linears of the base (on ``device``), turn
    on gradient checkpointing, move everything to ``device``.

    Raises
    ------
    FedLoraError
        Bad precision or quantization, a model without gradient checkpointing support, or
        (from :class:`~fedlora.lora.LoraModel`) target modules that are not in the model.
    """
    model = loaded.model
    heads = _head_paths(model)
    _cast_base(model, compute_dtype(precision), heads)
    lora_model = LoraModel(model, target_modules, loaded.head_module, lora_dropout)
    if quantization != "none":
        wrapped = [lora_model.paths[mid] for mid in lora_model.module_ids]

        def keep(path: str) -> bool:
            # Heads and everything LoRA adds (routers) train; the wrapped linears' frozen base is quantized.
            if _under_any(path, heads):
                return True
            return any(path.startswith(w + ".") and path != w + ".base" for w in wrapped)

        quantize_linears(model, quantization, device, keep)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise FedLoraError(
                f"{type(model).__name__} does not support gradient checkpointing; set "
                "train.gradient_checkpointing = false"
            )
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False  # a KV cache is of no use to a checkpointed training forward
        enable = getattr(model, "activation_checkpointing_enable")  # noqa: B009 - transformers' method, untyped
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    return lora_model


def as_trained_base(model: nn.Module, precision: str, quantization: str) -> None:
    """Give a freshly loaded fp32 model the frozen weights a run with these settings computed with.

    The base's weights are rounded to the compute dtype and, for a quantized run, replaced
    by their dequantized values (what the run's forward saw); the model stays fp32. A
    merged export adds the run's updates to these weights.
    """
    if precision == "fp32" and quantization == "none":
        return
    heads = _head_paths(model)
    _cast_base(model, compute_dtype(precision), heads)
    if quantization != "none":
        quantize_linears(model, quantization, torch.device("cpu"), functools.partial(_under_any, prefixes=heads))
        dequantize_linears(model)
    model.float()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (the frozen base's memory)."""
    tensors = [*model.parameters(), *model.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss_bytes() -> int:
    """The process's peak resident set (Linux: since the last reset; elsewhere: since start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak memory over a span (one round): resident set of the process and the accelerator's.

    ``peak_rss_bytes`` is the kernel's high-water mark of the process's resident memory
    (``VmHWM``), reset at :meth:`start` on Linux; where it cannot be reset it is the peak
    since the process started. ``peak_accel_bytes`` is torch's peak of allocated CUDA
    memory on ``device`` since :meth:`start`; None on the CPU and on MPS (which has no
    peak counter).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, int | None]:
        accel = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        return {"peak_rss_bytes": _peak_rss_bytes(), "peak_accel_bytes": accel}
