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


#: Name of the model cache in pytest's base temp directory.
CACHE_NAME = "fedlora-cache"


@pytest.fixture(scope="session", autouse=True)
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for the session (FEDLORA_CACHE): conversions happen once, never in ~/.cache.

    The workers of ``pytest -n`` share one cache in the base temp directory above theirs (an
    entry is built in a temp directory and renamed into place, so concurrent builds are safe);
    the controlling process deletes it when the session ends.
    """
    if "PYTEST_XDIST_WORKER" in os.environ:
        path = tmp_path_factory.getbasetemp().parent / CACHE_NAME
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp(CACHE_NAME, numbered=False)
    previous = os.environ.get("FEDLORA_CACHE")
    os.environ["FEDLORA_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FEDLORA_CACHE", None)
    else:
        os.environ["FEDLORA_CACHE"] = previous


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete the session's model cache (~540 MB with SmolLM2) in the process that owns the base temp."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        shutil.rmtree(factory.getbasetemp() / CACHE_NAME, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_first_load(shared_cache_dir: Path) -> Any:
    """Convert SmolLM2's GGUF once for the session (20-30 s), with the network blocked.

    A file lock in the cache makes the workers of ``pytest -n`` take turns: the first
    converts, the others find the finished entry.
    """
    import fcntl

    from fedlora.models import load_model

    with (shared_cache_dir / ".smollm2.lock").open("w") as lock, sockets_blocked():
        fcntl.flock(lock, fcntl.LOCK_EX)
        return load_model("smollm2-135m", task="causal_lm")
