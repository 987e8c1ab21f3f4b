"""Classification-head policy, shared by both runtimes and independent of the algorithm.

``frozen``
    The head keeps its shared seeded init and is never trained (the papers' setting).
``local``
    Each client trains its own head; it is private state and never leaves the client.
``federated``
    Each client trains the head; the server averages it (weighted by examples) every
    round and sends it with the payload. Its bytes are counted both ways.

Head tensors travel under keys ``head.<param>`` through the same state-dict boundary as
the adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.algorithms.base import Tensors, weighted_mean
from fedlora.lora import HEAD_PREFIX


def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIX)


class HeadPolicy:
    """Server side of the head policy: the federated head's state and its average."""

    def __init__(self, policy: str, initial: Tensors) -> None:
        self.policy = policy
        self.state: Tensors = dict(initial) if policy == "federated" else {}

    @property
    def trainable(self) -> bool:
        return self.policy != "frozen"

    def payload(self) -> Tensors:
        """Head tensors sent to every client (federated only)."""
        return self.state

    def aggregate(self, uploads: Mapping[int, Tensors], weights: Mapping[int, float]) -> None:
        if self.policy != "federated" or not uploads:
            return
        heads = {c: {k: v for k, v in t.items() if is_head_key(k)} for c, t in uploads.items()}
        self.state = weighted_mean(heads, weights)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: v for k, v in tensors.items() if is_head_key(k)}
