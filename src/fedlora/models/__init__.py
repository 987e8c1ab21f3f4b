"""Base models: the catalog, the cache, the builders of cached entries, and loading.

- :mod:`fedlora.models.catalog`: the one model table (:data:`MODELS`; names, tasks, sources).
- :mod:`fedlora.models.cache`: the cache directory and its atomic, versioned entries.
- :mod:`fedlora.models.builders`: tiny models with a seeded init, the SmolLM2 GGUF
  conversion, the sha256-checked MPNet assembly.
- :mod:`fedlora.models.load`: :func:`load_model` and :func:`load_tokenizer` (transformers,
  head seeding, default target modules).

The names :func:`load_model` and :func:`load_tokenizer` accept are the keys of
:data:`MODEL_CATALOG` plus ``path:<dir>`` for any local Hugging Face model directory
(``config.json``, weights and tokenizer files). Nothing is fetched from a hub.
"""

from __future__ import annotations

from fedlora.assets import asset_dir
from fedlora.models.cache import cache_dir
from fedlora.models.catalog import MODEL_CATALOG, MODELS, PATH_PREFIX, ModelEntry, Task
from fedlora.models.load import LoadedModel, load_model, load_tokenizer

__all__ = [
    "MODELS",
    "MODEL_CATALOG",
    "PATH_PREFIX",
    "LoadedModel",
    "ModelEntry",
    "Task",
    "asset_dir",
    "cache_dir",
    "load_model",
    "load_tokenizer",
]
