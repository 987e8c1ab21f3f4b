"""Shared fixtures: one model cache per test session, and a network blocker."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # One worker per core (`pytest -n 2`): a second torch thread per worker would only contend.
    import torch

    torch.set_num_threads(1)


@contextmanager
def sockets_blocked() -> Iterator[None]:
    """Any attempt to open a network connection raises (proves offline loading)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(f"network access attempted during an offline test: {args[:2]}")

    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for the session (FEDLORA_CACHE): conversions happen once, never in ~/.cache."""
    path = tmp_path_factory.mktemp("fedlora-cache")
    previous = os.environ.get("FEDLORA_CACHE")
    os.environ["FEDLORA_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FEDLORA_CACHE", None)
    else:
        os.environ["FEDLORA_CACHE"] = previous
    shutil.rmtree(path, ignore_errors=True)  # ~540 MB with SmolLM2


@pytest.fixture(scope="session")
def smollm2_first_load(shared_cache_dir: Path) -> Any:
    """Convert SmolLM2's GGUF once for the session (20-30 s), with the network blocked."""
    from fedlora.models import load_model

    with sockets_blocked():
        return load_model("smollm2-135m", task="causal_lm")
