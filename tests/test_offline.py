"""Every catalog model and dataset loads with network connections blocked."""

from __future__ import annotations

import os
from typing import Any

import pytest

from conftest import sockets_blocked
from fedlora.data import DATASET_CATALOG, load_dataset
from fedlora.models import MODEL_CATALOG, load_model


def test_package_sets_offline_environment() -> None:
    import fedlora  # noqa: F401

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[var] == "1"


def test_blocker_blocks() -> None:
    import socket

    with sockets_blocked(), pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.slow
def test_every_catalog_model_and_dataset_loads_offline(smollm2_first_load: Any) -> None:
    assert smollm2_first_load.task == "causal_lm"
    with sockets_blocked():
        for name in MODEL_CATALOG:
            task = "causal_lm" if name in ("smollm2-135m", "tiny-llama") else "classification"
            loaded = load_model(name, task=task, num_labels=2)
            assert loaded.tokenizer("offline")["input_ids"]
        for name in DATASET_CATALOG:
            dataset = load_dataset(name)
            assert len(dataset.texts) > 1000
        tiny = load_model("tiny-llama", task="classification", num_labels=3)
        assert tiny.head_module == "score"
