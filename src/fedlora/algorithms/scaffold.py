"""scaffold: SCAFFOLD's control variates on the LoRA factors.

Paper: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020, arXiv 1910.06378); in OpenFedLLM for LLM fine-tuning. The server
keeps the global LoRA ``x`` (A and B) and a control variate ``c`` of the same shapes;
each client keeps its own ``c_i`` (zero at first, private). In a round the client gets
``x`` and ``c`` (``c`` travels as the payload's ``hook_tensors``: it doubles the download),
and every local step follows the corrected gradient ``g + c - c_i`` (the hook adds the
loss term ``sum <c - c_i, w>``, whose gradient is ``c - c_i``). After ``K`` steps at
learning rate ``lr`` from ``x`` to ``y_i`` it updates (the paper's option II)

    c_i+ = c_i - c + (x - y_i) / (K lr)

keeps ``c_i+`` and uploads ``y_i`` and ``delta c_i = c_i+ - c_i`` (doubling the upload).
The server averages ``x <- mean_w(y_i)`` as FedIT (the paper's global step size 1) and
``c <- c + |S| / N * mean(delta c_i)`` over the ``|S|`` participants of ``N`` clients.

**[choice]** The local optimizer stays AdamW (the paper's analysis assumes SGD: with Adam
the correction is added to the gradient before Adam's scaling, and ``(x - y_i) / (K lr)``
is the mean step over ``lr``, not the mean gradient; OpenFedLLM makes the same
approximation with its Adam-based trainer). A trained head is not corrected.

Options
-------
weighting : "examples" (default) or "uniform": FedIT weights of the LoRA average
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.algorithms.base import (
    ClientHooks,
    FederationContext,
    Options,
    Payload,
    Tensors,
    Update,
    register,
)
from fedlora.algorithms.fedit import FedIt


class ControlVariates(ClientHooks):
    """The client side of SCAFFOLD: ``tensors`` is the server's ``c``, ``state`` the client's ``c_i``."""

    def _ci(self, key: str) -> torch.Tensor:
        return self.state.get(key, torch.zeros_like(self.tensors[key]))

    def extra_loss(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        terms = [((self.tensors[k] - self._ci(k)).to(w) * w).sum() for k, w in trained.items() if k in self.tensors]
        return torch.stack(terms).sum() if terms else None

    def finish(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], steps: int, lr: float
    ) -> tuple[Tensors, Tensors]:
        new = {k: self._ci(k) - c + (received[k] - trained[k]) / (steps * lr) for k, c in self.tensors.items()}
        return {k: new[k] - self._ci(k) for k in new}, new


@register
class Scaffold(FedIt):
    name = "scaffold"
    description = "SCAFFOLD: FedIT with server and client control variates on the LoRA factors (drift correction)"
    paper = "arXiv 1910.06378"
    client_hooks = ControlVariates

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.control: Tensors = {k: torch.zeros_like(v) for k, v in self.global_lora.items()}

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: Payload(self.layout, self.global_lora, hook_tensors=self.control) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        super().aggregate(rnd, updates)
        share = len(updates) / len(self.ctx.client_ids)
        self.control = {
            k: c + share * torch.stack([u.hook_tensors[k] for u in updates.values()]).mean(0)
            for k, c in self.control.items()
        }

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {**self.global_lora, **{f"control/{k}": v for k, v in self.control.items()}}, {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = {k: v for k, v in tensors.items() if not k.startswith("control/")}
        self.control = {k.removeprefix("control/"): v for k, v in tensors.items() if k.startswith("control/")}
