"""fedprox: FedProx on LoRA factors, FedIT's server with a proximal client objective.

Paper: Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020,
arXiv 1812.06127); in OpenFedLLM and Flower for LLM fine-tuning. Each client minimises

    task loss + mu / 2 * sum_k ||w_k - w_k^received||^2

over its trained LoRA factors ``w_k`` (A and B of every adapted module), where
``w^received`` is what it loaded at the start of the round; the server averages A and B
as FedIT does. The proximal term keeps local models near the global one under
heterogeneous data. It is a client-side hook (:class:`ProximalTerm`): the payload's
instruction carries ``mu``; nothing else changes on the wire. ``mu = 0`` is FedIT exactly.
The reported ``train_loss`` is the task's loss, without the proximal term.

Options
-------
mu : float >= 0, default 0.01: the proximal weight
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedlora.algorithms.base import ClientHooks, Payload, WeightingOptions, register
from fedlora.algorithms.fedit import FedIt
from fedlora.errors import FedLoraError
from fedlora.heads import is_head_key


@dataclass
class FedProxOptions(WeightingOptions):
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise FedLoraError(f"algorithm.mu = {self.mu}: the proximal weight must be >= 0 (0 = fedit)")


class ProximalTerm(ClientHooks):
    """``mu / 2 * sum ||w - w_received||^2`` over the trained LoRA factors (not the head)."""

    def extra_loss(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        mu = float(self.instruction.get("mu", 0.0))
        if mu == 0.0:
            return None
        squares = [((value - received[key]) ** 2).sum() for key, value in trained.items() if not is_head_key(key)]
        return 0.5 * mu * torch.stack(squares).sum()


@register
class FedProx(FedIt):
    name = "fedprox"
    description = "FedProx: FedIT with a proximal term mu/2 ||w - w_received||^2 on the clients' LoRA factors"
    paper = "arXiv 1812.06127"
    options_class = FedProxOptions
    options: FedProxOptions
    client_hooks = ProximalTerm

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: replace(p, instruction={"mu": self.options.mu}) for c, p in super().configure(rnd, clients).items()}
