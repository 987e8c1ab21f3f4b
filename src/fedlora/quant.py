"""Weight-only quantization of the frozen base (QLoRA-style), through bitsandbytes.

``model.quantization = "nf4"`` stores every frozen linear weight of the base in 4-bit
NormalFloat (blockwise absmax over 64 weights, as QLoRA); ``"int8"`` stores it in 8 bits
with one absmax scale per output row. Adapters, heads and routers stay in fp32 and train
as usual; the quantized weight is dequantized to the compute dtype on every use and never
kept for the backward pass (:class:`_FrozenMatmul` dequantizes again there), so the frozen
base costs its packed size plus one layer's dequantized weight at a time.

The packing and unpacking are bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` and
``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``: its CUDA kernels where the
weights sit on a GPU, its CPU backend otherwise (so the test suite runs it). bitsandbytes
is imported only when a run quantizes (``pip install fedlora[quant]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn import functional as F

from fedlora.errors import FedLoraError

Scheme = Literal["nf4", "int8"]
SCHEMES: tuple[Scheme, ...] = ("nf4", "int8")
NF4_BLOCKSIZE = 64
"""Weights per absmax scale in NF4 (QLoRA's choice)."""


@functools.cache
def _bitsandbytes() -> ModuleType:
    """``bitsandbytes.functional``, imported on first use."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise FedLoraError(
            "model.quantization needs bitsandbytes; run `pip install 'fedlora[quant]'` "
            "(or set model.quantization = 'none')"
        ) from exc
    return bnb_functional


class _FrozenMatmul(torch.autograd.Function):
    """``x W^T`` with ``W`` dequantized in the forward and again in the backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer: QuantizedLinear = ctx.layer
        return grad @ layer.dequantized(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored quantized.

    Parameters
    ----------
    linear
        The layer to replace; its weight is quantized on ``device``.
    scheme
        ``"nf4"`` or ``"int8"``.
    device
        Where the packed weight lives (quantization runs there).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, scheme: Scheme, device: torch.device) -> None:
        super().__init__()
        bnb = _bitsandbytes()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.scheme = scheme
        self.weight_dtype = linear.weight.dtype
        weight = linear.weight.detach().to(device)
        if scheme == "nf4":
            packed, state = bnb.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
            self.register_buffer("packed", packed)
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("code", state.code)
        else:
            rows, scales, _ = bnb.int8_vectorwise_quant(weight)
            self.register_buffer("packed", rows)
            self.register_buffer("absmax", scales)
            self.register_buffer("code", torch.empty(0, device=device))
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @property
    def num_weights(self) -> int:
        """Entries of the (unquantized) weight matrix: what the layer counts as parameters."""
        return self.in_features * self.out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``out_features x in_features`` in ``dtype``."""
        bnb = _bitsandbytes()
        if self.scheme == "nf4":
            state = bnb.QuantState(
                absmax=self.absmax,
                shape=torch.Size((self.out_features, self.in_features)),
                code=self.code,
                blocksize=NF4_BLOCKSIZE,
                quant_type="nf4",
                dtype=dtype,
            )
            return cast(torch.Tensor, bnb.dequantize_4bit(self.packed, state))
        return cast(torch.Tensor, bnb.int8_vectorwise_dequant(self.packed, self.absmax)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            out = cast(torch.Tensor, _FrozenMatmul.apply(x, self))
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        return out

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (in the original dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.packed.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized(self.weight_dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.to(self.weight_dtype).requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_linears(root: nn.Module, scheme: str, device: torch.device, keep: Callable[[str], bool]) -> list[str]:
    """Replace every ``nn.Linear`` under ``root`` by a :class:`QuantizedLinear`, in place.

    Parameters
    ----------
    root
        The module to walk.
    scheme
        ``"nf4"`` or ``"int8"``.
    device
        Where quantization runs and the packed weights live.
    keep
        Called with a linear's path; True leaves that linear unquantized (trainable parts).

    Returns
    -------
    list of str
        The paths of the quantized linears.
    """
    if scheme not in SCHEMES:
        raise FedLoraError(f"unknown quantization {scheme!r}; use one of {', '.join(SCHEMES)}")
    paths = [p for p, m in root.named_modules() if isinstance(m, nn.Linear) and p and not keep(p)]
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        linear = cast(nn.Linear, getattr(parent, name))
        setattr(parent, name, QuantizedLinear(linear, scheme, device))
    return paths


def dequantize_linears(root: nn.Module) -> int:
    """Replace every :class:`QuantizedLinear` under ``root`` by its dequantized ``nn.Linear``; return how many."""
    paths = [p for p, m in root.named_modules() if isinstance(m, QuantizedLinear)]
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, name, cast(QuantizedLinear, getattr(parent, name)).to_linear())
    return len(paths)
