"""Loading a base model and its tokenizer for LoRA: from a catalog name or ``path:<dir>``.

The directory comes from :mod:`fedlora.models.catalog` (built into the cache on first use);
this module reads it with transformers, seeds a classification head, and picks the
default target modules (peft's per-architecture table, then known namings).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from fedlora.errors import FedLoraError
from fedlora.models.builders import INIT_STD, init_parameters, no_progress_bars
from fedlora.models.catalog import PATH_PREFIX, Task, check_task, local_dir, model_entry

if TYPE_CHECKING:  # transformers' model classes take seconds to import: `fedlora list` needs none
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

_log = logging.getLogger(__name__)

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
        task = check_task(task)
    directory = local_dir(name) if name.startswith(PATH_PREFIX) else model_entry(name).tokenizer_dir()
    return _read_tokenizer(directory, task)


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
        with no_progress_bars():
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
    name: str, *, task: Task, num_labels: int | None = None, head_seed: int = 0, head_init_std: float = INIT_STD
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
    task = check_task(task)
    if task == "classification" and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2):
        raise FedLoraError(f"classification needs num_labels >= 2 (got {num_labels!r}); set it from the data set")
    if name.startswith(PATH_PREFIX):
        build_source: Callable[[], Path] = functools.partial(local_dir, name)
    else:
        entry = model_entry(name)
        if task not in entry.tasks:
            raise FedLoraError(
                f"model {name!r} supports only {', '.join(entry.tasks)}, not {task}; "
                "pick another model from `fedlora list`"
            )
        build_source = functools.partial(entry.source, name)
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
        init_parameters(model.get_submodule(head), head_seed + i, per_name=False, std=std)
    return heads
