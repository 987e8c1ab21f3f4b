"""Crash-safe files: atomic writes and checksummed checkpoint directories.

Every file a run depends on for resuming is written to a temporary name, flushed to disk
(``fsync``) and renamed over its final name, so a crash leaves either the old file or the
new one, never half of one. A checkpoint is a directory ``round_NNNNN/`` (``NNNNN`` = the
next round to run) holding a ``manifest.json`` with the SHA-256 of every other file; it is
assembled under a temporary name and renamed into place when complete. Reading a
checkpoint verifies every checksum, so a truncated or damaged one is detected and named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from fedlora.errors import FedLoraError

__all__ = [
    "checkpoint_problem",
    "list_checkpoints",
    "read_checkpoint",
    "select_checkpoint",
    "sha256",
    "write_atomic",
    "write_checkpoint",
]

MANIFEST = "manifest.json"
PREFIX = "round_"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_checkpoint(root: Path, next_round: int, files: Mapping[str, bytes], keep: int) -> Path:
    """Write one checkpoint directory atomically and keep only the newest ``keep``.

    Parameters
    ----------
    root
        The checkpoints directory of the run.
    next_round
        The first round a resumed run will run; names the directory.
    files
        File name -> contents.
    keep
        How many checkpoints to keep (the newest ones).

    Returns
    -------
    pathlib.Path
        The checkpoint directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{next_round:05d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, data in files.items():
        _write_synced(tmp / name, data)
    manifest = {"next_round": next_round, "sha256": {name: sha256(data) for name, data in files.items()}}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())


def _read_verified(path: Path) -> tuple[dict[str, bytes] | None, str | None]:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return None, f"{manifest_file} is missing"
    try:
        manifest = json.loads(manifest_file.read_bytes())
        expected = dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError):
        return None, f"{manifest_file} is truncated or not valid JSON"
    files: dict[str, bytes] = {}
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            return None, f"{file} is missing"
        data = file.read_bytes()
        if sha256(data) != digest:
            return None, f"{file} is truncated or corrupted (its SHA-256 does not match {MANIFEST})"
        files[name] = data
    return files, None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint directory, or ``None`` if every checksum matches."""
    return _read_verified(path)[1]


def read_checkpoint(path: Path) -> dict[str, bytes]:
    """The verified files of a checkpoint; raise :class:`FedLoraError` if it is damaged."""
    files, problem = _read_verified(path)
    if files is None:
        raise FedLoraError(f"checkpoint {path} is damaged: {problem}")
    return files


def select_checkpoint(root: Path, *, last_good: bool) -> Path | None:
    """The checkpoint to resume from: the newest, or with ``last_good`` the newest intact one.

    Returns ``None`` when there is no checkpoint at all (the run never finished a round).

    Raises
    ------
    FedLoraError
        If the newest checkpoint is damaged and ``last_good`` is false (the message names
        the file and says what to do), or if no checkpoint is intact.
    """
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    problems: list[str] = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(problem)
        if not last_good:
            older = [p for p in checkpoints if p != path]
            advice = (
                f"continue from the previous checkpoint ({older[-1].name}) with --resume-from-last-good"
                if older
                else "start the run again with --overwrite"
            )
            raise FedLoraError(f"cannot resume: {problem}; {advice}")
    raise FedLoraError(f"cannot resume: no intact checkpoint ({'; '.join(problems)}); start again with --overwrite")
