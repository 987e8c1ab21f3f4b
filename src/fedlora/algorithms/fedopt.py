"""fedavgm, fedadam, fedyogi, fedadagrad: server optimizers over the FedIT update.

Papers: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (FedAvgM, arXiv 1909.06335); Reddi et al., "Adaptive
Federated Optimization" (FedAdam, FedYogi, FedAdagrad; ICLR 2021, arXiv 2003.00295); as
in OpenFedLLM and Flower's strategies. Clients train as in FedIT. The server treats the
FedIT average as a step: ``delta = mean_w(x_k) - x`` per tensor (A and B separately),
and applies an optimizer to it, element-wise, with state ``m`` and ``v`` kept per tensor
(zeros at the start, as Flower's strategies):

- ``fedavgm``: ``m = beta1 m + delta``; ``x = x + eta m``
- ``fedadam``: ``m = beta1 m + (1 - beta1) delta``; ``v = beta2 v + (1 - beta2) delta^2``;
  ``x = x + eta m / (sqrt(v) + tau)``
- ``fedyogi``: as fedadam, but ``v = v - (1 - beta2) delta^2 sign(v - delta^2)``
- ``fedadagrad``: as fedadam, but ``v = v + delta^2``

``fedavgm`` with ``beta1 = 0`` and ``eta = 1`` is FedIT exactly. The defaults **[choice]**
follow the papers' and Flower's where they work for LoRA factors: fedavgm ``eta = 1``,
``beta1 = 0.9`` (Hsu et al.); the adaptive ones ``eta = 0.01``, ``beta1 = 0.9``,
``beta2 = 0.99``, ``tau = 1e-3`` (Reddi et al.'s tau range; Flower's ``tau = 1e-9`` with
``eta = 0.1`` moves every LoRA element by about 0.1 per round), fedadagrad ``beta1 = 0``.
The optimizer state stays on the server; nothing changes on the wire.

Options
-------
eta : float > 0: the server learning rate
beta1 : float in [0, 1): momentum
beta2 : float in [0, 1): second-moment decay (fedadam, fedyogi)
tau : float > 0: adaptivity (fedadam, fedyogi, fedadagrad)
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedlora.algorithms.base import (
    FederationContext,
    Options,
    Tensors,
    Update,
    WeightingOptions,
    register,
)
from fedlora.algorithms.fedit import FedIt
from fedlora.errors import FedLoraError


@dataclass
class ServerOptOptions(WeightingOptions):
    eta: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta <= 0:
            raise FedLoraError(f"algorithm.eta = {self.eta}: the server learning rate must be > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise FedLoraError(f"algorithm.{name} = {value}: use a decay in [0, 1)")
        if self.tau <= 0:
            raise FedLoraError(f"algorithm.tau = {self.tau}: the adaptivity must be > 0")


@dataclass
class FedAvgMOptions(ServerOptOptions):
    eta: float = 1.0


@dataclass
class FedAdagradOptions(ServerOptOptions):
    beta1: float = 0.0


class ServerOptimizer(FedIt):
    """FedIT's clients; the server steps along the FedIT average with an optimizer."""

    options: ServerOptOptions
    #: ``avgm``, ``adam``, ``yogi`` or ``adagrad``.
    rule: ClassVar[str]

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        self.m: Tensors = {k: torch.zeros_like(v) for k, v in self.global_lora.items()}
        self.v: Tensors = {k: torch.zeros_like(v) for k, v in self.global_lora.items()}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        o = self.options
        mean = self.client_mean({c: u.tensors for c, u in updates.items()})
        stepped: Tensors = {}  # a new dict: payloads already sent keep the tensors they were given
        for key, x in self.global_lora.items():
            delta = mean[key] - x
            if self.rule == "avgm":
                self.m[key] = o.beta1 * self.m[key] + delta
                stepped[key] = x + o.eta * self.m[key]
                continue
            self.m[key] = o.beta1 * self.m[key] + (1.0 - o.beta1) * delta
            square = delta * delta
            if self.rule == "adam":
                self.v[key] = o.beta2 * self.v[key] + (1.0 - o.beta2) * square
            elif self.rule == "yogi":
                self.v[key] = self.v[key] - (1.0 - o.beta2) * square * torch.sign(self.v[key] - square)
            else:
                self.v[key] = self.v[key] + square
            stepped[key] = x + o.eta * self.m[key] / (self.v[key].sqrt() + o.tau)
        self.global_lora = stepped

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = dict(self.global_lora)
        tensors.update({f"m/{k}": v for k, v in self.m.items()})
        tensors.update({f"v/{k}": v for k, v in self.v.items()})
        return tensors, {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_lora = {k: v for k, v in tensors.items() if not k.startswith(("m/", "v/"))}
        self.m = {k[2:]: v for k, v in tensors.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in tensors.items() if k.startswith("v/")}


@register
class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    description = "FedAvgM: FedIT's average as a server step with momentum (Hsu et al.)"
    paper = "arXiv 1909.06335"
    options_class = FedAvgMOptions
    rule = "avgm"


@register
class FedAdam(ServerOptimizer):
    name = "fedadam"
    description = "FedAdam: FedIT's average as a server step with Adam (Reddi et al.)"
    paper = "arXiv 2003.00295"
    options_class = ServerOptOptions
    rule = "adam"


@register
class FedYogi(ServerOptimizer):
    name = "fedyogi"
    description = "FedYogi: FedIT's average as a server step with Yogi (Reddi et al.)"
    paper = "arXiv 2003.00295"
    options_class = ServerOptOptions
    rule = "yogi"


@register
class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"
    description = "FedAdagrad: FedIT's average as a server step with Adagrad (Reddi et al.)"
    paper = "arXiv 2003.00295"
    options_class = FedAdagradOptions
    rule = "adagrad"
