"""fedlora: federated fine-tuning of transformers with LoRA.

Importing the package makes every Hugging Face library offline: no model or data set is
ever fetched from a hub at run time (see ``fedlora.models`` and ``fedlora.data`` for where
the shipped assets live).
"""

from __future__ import annotations

import logging
import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes' CPU backend warns on import (by fedlora.quant, or by peft and transformers,
# which probe for it) that an optional kernel fetched from a hub is absent; nothing here
# fetches, and its plain CPU path is the one fedlora.quant uses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from fedlora.errors import FedLoraError  # noqa: E402

__all__ = ["FedLoraError", "__version__"]
__version__ = "0.1.0"
