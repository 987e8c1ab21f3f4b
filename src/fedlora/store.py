"""Private client state kept across rounds, on disk, one file per client version.

A federation of 10,000 cross-device clients cannot hold every client's private tensors
(FedSA's B, FedTreeLoRA's lambda, ``local``'s whole LoRA) in memory. The store keeps each
client's state in ``<root>/<client>.<round>.safetensors`` (``round`` = the round that
produced it), written atomically, and reads it back on demand with its checksum checked.
Only an index ``client -> (round, sha256)`` stays in memory; checkpoints save that index,
so a checkpoint refers to immutable files and resuming from an older checkpoint finds the
versions it refers to. :meth:`ClientStore.collect` deletes versions that no kept
checkpoint and not the live index refers to.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedlora.checkpoint import sha256, write_atomic
from fedlora.errors import FedLoraError

__all__ = ["ClientStore"]

Tensors = dict[str, torch.Tensor]
_SUFFIX = ".safetensors"


class ClientStore:
    """Private state of every client, loaded on demand from ``root``.

    Parameters
    ----------
    root
        Directory of the client files (created on the first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[int, tuple[int, str]] = {}

    def _path(self, client: int, version: int) -> Path:
        return self.root / f"{client}.{version}{_SUFFIX}"

    def get(self, client: int) -> Tensors:
        """The client's private tensors (empty for a client that has none yet)."""
        entry = self._index.get(client)
        if entry is None:
            return {}
        path = self._path(client, entry[0])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FedLoraError(
                f"{path} (client {client}'s private state) is missing; resume from an earlier checkpoint with "
                "--resume-from-last-good or start again with --overwrite"
            ) from None
        if sha256(data) != entry[1]:
            raise FedLoraError(
                f"{path} (client {client}'s private state) is corrupted: its SHA-256 does not match the checkpoint; "
                "resume from an earlier checkpoint with --resume-from-last-good or start again with --overwrite"
            )
        return dict(load_tensors(data))

    def put(self, client: int, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Store the client's new private state, produced in round ``version``."""
        if not tensors:
            self._index.pop(client, None)
            return
        data = save_tensors({k: v.detach().contiguous() for k, v in tensors.items()})
        write_atomic(self._path(client, version), data)
        self._index[client] = (version, sha256(data))

    def __len__(self) -> int:
        return len(self._index)

    # --- index (what a checkpoint saves) ----------------------------------------------
    def index_bytes(self) -> bytes:
        return json.dumps({str(c): [v, digest] for c, (v, digest) in sorted(self._index.items())}).encode()

    def load_index(self, data: bytes) -> None:
        self._index = {int(c): (int(v), str(digest)) for c, (v, digest) in _parse_index(data).items()}

    def collect(self, kept_indices: Iterable[bytes]) -> None:
        """Delete client files that neither the live index nor any of ``kept_indices`` refers to."""
        if not self.root.is_dir():
            return
        referenced = {self._path(c, v).name for c, (v, _) in self._index.items()}
        for data in kept_indices:
            referenced.update(self._path(int(c), int(v)).name for c, (v, _) in _parse_index(data).items())
        for path in self.root.iterdir():
            if (path.name.endswith(_SUFFIX) and path.name not in referenced) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def _parse_index(data: bytes) -> dict[str, Any]:
    parsed: Any = json.loads(data)
    if not isinstance(parsed, dict):
        raise FedLoraError("the client index of a checkpoint is not a JSON object; the checkpoint is damaged")
    return parsed
