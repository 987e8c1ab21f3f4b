"""The one byte accounting of every runtime: what a client's round moves over the wire.

The server loop (:meth:`fedlora.simulation.Simulation._run_clients`) calls these for each
client whose update it accepts, in the simulator and on Flower alike, so both runtimes
report the same numbers by construction. A count is tensor data only: elements x item size
(fp32 adapters), no framing, no serialisation header, no TLS. Where a payload sets
``wire_bytes`` the download count is a model of the wire (the algorithm's description of a
smaller message the client could rebuild its tensors from), not a measurement; see
docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.algorithms.base import Payload, Update
from fedlora.lora import num_bytes

__all__ = ["bytes_down", "bytes_up"]


def bytes_down(payload: Payload, head: Mapping[str, torch.Tensor]) -> int:
    """Bytes sent to a client: its payload (``wire_bytes`` where the algorithm models the wire),
    its hooks' tensors, and the head tensors, which are sent only to a client that uploads."""
    return payload.download_bytes() + num_bytes(payload.hook_tensors) + (num_bytes(head) if payload.upload else 0)


def bytes_up(update: Update, head_upload: Mapping[str, torch.Tensor]) -> int:
    """Bytes a client sends back: its uploaded adapter tensors, its hooks' uploads and a
    federated head's tensors."""
    return num_bytes(update.tensors) + num_bytes(update.hook_tensors) + num_bytes(head_upload)
