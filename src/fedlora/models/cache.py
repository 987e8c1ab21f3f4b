"""The model cache: ``$FEDLORA_CACHE`` (or ``~/.cache/fedlora``), one directory per entry.

Every entry is built in a temporary sibling directory and renamed into place when
complete (with a marker naming the entry and its recipe version), so an interrupted build
is never reused and two processes racing on the same entry both end up with a complete
copy (the loser discards its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

MARKER = "fedlora-cache.json"
STALE_TEMP_S = 3600.0


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


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: Path, name: str, version: int) -> bool:
    """Whether ``path`` holds a finished build of entry ``name`` at recipe ``version``."""
    marker = read_marker(path)
    return marker is not None and marker.get("entry") == name and marker.get("version") == version


def remove_stale_temps(root: Path, name: str) -> None:
    """Delete temp dirs of ``name`` left by killed builds (older than an hour)."""
    now = time.time()
    for tmp in root.glob(f".{name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


def ensure_cached(name: str, build: Callable[[Path], None], version: int = 1) -> Path:
    """Return ``cache_dir()/name``, building it with ``build(tmp_dir)`` if absent.

    ``version`` is the recipe's: an entry built by another version is rebuilt.

    The build writes into a fresh temp dir next to the target, which is renamed into place
    only when complete; when another process finished first, its copy is used.
    """
    root = cache_dir()
    target = root / name
    if is_complete(target, name, version):
        return target
    if target.exists():
        marker = read_marker(target)
        if marker is None or marker.get("entry") != name:
            raise FedLoraError(
                f"{target} exists but was not written by fedlora; delete it or set FEDLORA_CACHE to another directory"
            )
        # Our own entry from an older recipe: move it aside, then rebuild.
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, trash / name)
        shutil.rmtree(trash, ignore_errors=True)
    remove_stale_temps(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        marker = {"entry": name, "version": version}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is not
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(target, name, version):
            raise
    return target
