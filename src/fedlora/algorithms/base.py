"""The algorithm interface shared by the simulator and the Flower runtime.

An algorithm is server-side logic over plain tensors. Each round:

1. :meth:`Algorithm.configure` returns a :class:`Payload` per sampled client: the
   adapter :class:`~fedlora.lora.Layout` it trains, the tensors it loads, and which of
   its trained tensors it uploads.
2. The client loads its private state, then the payload (the payload wins where both
   name a key), trains every trainable tensor of the layout, and splits what it trained:
   keys matching ``Payload.upload`` go up in an :class:`Update`, the rest stay private.
3. :meth:`Algorithm.aggregate` folds the round's updates into the server state.

Nothing here imports a runtime: an algorithm is testable with a dict of tensors.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedlora.errors import FedLoraError
from fedlora.lora import MIX_SLOT, Layout, ModuleId, ModuleLayout, SlotSpec, num_bytes, parse_key

Tensors = dict[str, torch.Tensor]


@dataclass
class FederationContext:
    """What an algorithm knows about the federation when it is built."""

    client_ids: list[int]
    num_examples: dict[int, int]
    module_shapes: dict[ModuleId, tuple[int, int]]
    rank: int
    alpha: float
    ranks: dict[int, int]
    seed: int
    rounds: int
    #: The clients' learning rate (``train.lr``), for algorithms that give some tensors an
    #: absolute rate of their own (through ``lr_multipliers``); ``None`` where unknown.
    lr: float | None = None

    @property
    def module_ids(self) -> list[ModuleId]:
        return sorted(self.module_shapes)

    @property
    def num_layers(self) -> int:
        return 1 + max(mid.layer for mid in self.module_shapes)


class ClientHooks:
    """Client-side behaviour an algorithm declares (:attr:`Algorithm.client_hooks`).

    The client builds its algorithm's hooks each round from the payload's ``instruction``
    (plain JSON values), with the class taken from the registry by the run config's
    algorithm name: a message never names a class. The defaults change nothing; a subclass
    overrides what its method needs:

    - :meth:`extra_loss`: a term added to the task's loss at every local step (FedProx's
      proximal term, SCAFFOLD's correction);
    - :attr:`weights_instances` and :meth:`slot_weights`: per-example slot weights at
      evaluation (FedDPA's instance-wise weighting);
    - :meth:`report`: numbers the client sends back with its update (FedTreeLoRA's lambdas);
    - :meth:`finish`: tensors of the method's own that go up in ``Update.hook_tensors`` and
      that the client keeps (SCAFFOLD's control variates).

    ``tensors`` are the payload's ``hook_tensors`` (sent by the server, never loaded into
    the model) and ``state`` the hooks' private state the client kept from its last round.
    """

    def __init__(
        self,
        instruction: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.instruction = dict(instruction)
        self.tensors: Tensors = dict(tensors or {})
        self.state: Tensors = dict(state or {})

    def extra_loss(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """A term added to the loss of every local step, from the live trained tensors (with
        gradients) and the tensors the client started the round from; None adds nothing."""
        return None

    @property
    def weights_instances(self) -> bool:
        """Whether evaluation weights slots per example (then :meth:`slot_weights` is called)."""
        return False

    def slot_weights(self, features: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slot name -> ``(batch,)`` weights for a batch of pooled input ``features`` (batch x
        dim); ``reference`` is the mean feature of the client's training set. The weights
        replace the fixed weights of the named slots of ``sum``-mixed modules for that batch."""
        raise NotImplementedError(f"{type(self).__name__} does not weight instances")

    def report(self, trained: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Numbers sent back in ``Update.metrics`` after training (keys ``lambda/<module>``
        are collected into ``summary.json``'s ``structure["lambdas"]``)."""
        return {}

    def finish(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], steps: int, lr: float
    ) -> tuple[Tensors, Tensors]:
        """After ``steps`` local steps at learning rate ``lr`` from ``received`` to ``trained``:
        the tensors to upload (``Update.hook_tensors``: the keys and shapes of the payload's
        ``hook_tensors``) and the hooks' new private state."""
        return {}, self.state


#: Prefix of the ``Update.metrics`` keys that report a module's mixing weight.
LAMBDA_REPORT = "lambda/"


class ReportLambdas(ClientHooks):
    """Reports ``lambda = sigmoid(theta)`` of every mixing scalar the client trained, as
    ``lambda/<module prefix>`` (the server never receives theta itself)."""

    def report(self, trained: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {
            f"{LAMBDA_REPORT}{parse_key(key).module_id.prefix()}": float(torch.sigmoid(value))
            for key, value in trained.items()
            if key.endswith(f".{MIX_SLOT}.theta")
        }


@dataclass
class Payload:
    """What the server sends one client for one round.

    Attributes
    ----------
    layout
        The adapter slots the client trains this round.
    tensors
        Adapter tensors to load (counted as download bytes).
    upload
        fnmatch patterns over keys: trained tensors that match go up, the rest stay
        private to the client. ``("*",)`` uploads everything trained; ``()`` nothing.
    wire_bytes
        Bytes actually sent, where the client rebuilds ``tensors`` from a smaller message
        (e.g. a dense base update rebuilt from stacked low-rank factors); ``None`` means
        the bytes of ``tensors``.
    instruction
        The round's client instruction: JSON values the algorithm's :class:`ClientHooks`
        are built from on the client (serialised once by the wire format).
    hook_tensors
        Tensors for the client's hooks, not loaded into the model (SCAFFOLD's server control
        variate); counted as download bytes.
    lr_multipliers
        Learning-rate multipliers of the trained tensors whose key matches an fnmatch
        pattern (the first match wins; others train at ``train.lr``). Filled in from
        :attr:`Algorithm.lr_multipliers` by :meth:`Algorithm.payloads`.
    """

    layout: Layout
    tensors: Tensors
    upload: tuple[str, ...] = ("*",)
    wire_bytes: int | None = None
    instruction: dict[str, Any] = field(default_factory=dict)
    hook_tensors: Tensors = field(default_factory=dict)
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def download_bytes(self) -> int:
        return num_bytes(self.tensors) if self.wire_bytes is None else self.wire_bytes

    def split(self, trained: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
        """Split trained tensors into (upload, private) by the ``upload`` patterns."""
        if not self.upload:
            return {}, dict(trained)
        pattern = re.compile("|".join(fnmatch.translate(p) for p in self.upload))
        up: Tensors = {}
        private: Tensors = {}
        for key, value in trained.items():
            (up if pattern.match(key) else private)[key] = value
        return up, private


@dataclass
class Update:
    """What one client sends back after local training.

    ``hook_tensors`` are its hooks' uploads (:meth:`ClientHooks.finish`), with the keys and
    shapes of the payload's ``hook_tensors``; counted as upload bytes."""

    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    hook_tensors: Tensors = field(default_factory=dict)


@dataclass
class Options:
    """Base of every algorithm's options dataclass (fields = the ``[algorithm]`` keys)."""

    #: Former option names -> their current names (refused with a message naming the new key).
    renamed: ClassVar[dict[str, str]] = {"warmup": "warmup_rounds"}


@dataclass
class WeightingOptions(Options):
    """Options of a method that weights clients by ``examples`` (``q_k = n_k / sum n``) or ``uniform``.

    Subclasses add their own fields and call ``super().__post_init__()``.
    """

    weighting: str = "examples"

    def __post_init__(self) -> None:
        if self.weighting not in ("examples", "uniform"):
            raise FedLoraError(f"algorithm.weighting = {self.weighting!r}: use 'examples' or 'uniform'")


class Algorithm(ABC):
    """Base class of every federated algorithm.

    Subclasses set ``name``, ``description``, ``paper`` and ``options_class``; implement
    :meth:`configure` and :meth:`aggregate`; and override the optional hooks where they
    learn something (:meth:`structure`), keep a global model (:meth:`global_payload`) or
    hold server state (:meth:`state_dict` / :meth:`load_state_dict`).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    options_class: ClassVar[type[Options]] = Options
    #: Whether clients may hold different LoRA ranks (``model.ranks``); the others refuse them.
    mixed_ranks: ClassVar[bool] = False
    #: What the algorithm's clients do besides plain training (see :class:`ClientHooks`).
    client_hooks: ClassVar[type[ClientHooks]] = ClientHooks
    #: Learning-rate multipliers for tensors whose key matches an fnmatch pattern (a
    #: subclass may set it per instance, from its options).
    lr_multipliers: Mapping[str, float] = {}

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        if not self.mixed_ranks and len(set(ctx.ranks.values())) > 1:
            raise FedLoraError(f"{self.name} needs one rank for all clients; use a heterogeneous-rank method")
        self.ctx = ctx
        self.options = options

    # --- server hooks ---------------------------------------------------------------
    def payloads(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """What the runtimes send: :meth:`configure`'s payloads, each carrying what the
        client needs from the algorithm besides tensors (its learning-rate multipliers)."""
        mults = dict(self.lr_multipliers)
        return {
            c: p if p.lr_multipliers or not mults else replace(p, lr_multipliers=mults)
            for c, p in self.configure(rnd, clients).items()
        }

    @abstractmethod
    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Payloads for the clients sampled in round ``rnd``."""

    @abstractmethod
    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        """Fold the round's client updates into the server state."""

    def global_payload(self) -> Payload | None:
        """The one model for all clients, if the algorithm has one (else None)."""
        return None

    def structure(self) -> dict[str, Any]:
        """What the algorithm learned about the federation, for ``summary.json``."""
        return {}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """Server state for checkpoints: tensors and JSON-able metadata."""
        return {}, {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""
        return None

    # --- helpers for subclasses -----------------------------------------------------
    def lora_layout(self, rank: int | None = None, *, slot: str = "lora", train_a: bool = True) -> Layout:
        """One plain LoRA slot on every adapted module."""
        r = rank if rank is not None else self.ctx.rank
        spec = SlotSpec(slot, r, self.ctx.alpha, train_a=train_a)
        return Layout.uniform(self.ctx.module_ids, ModuleLayout(slots=(spec,)))

    def weights(self, clients: Sequence[int], weighting: str = "examples") -> dict[int, float]:
        """Aggregation weights q_k over ``clients`` (by examples, or uniform).

        ``ctx.num_examples`` starts from the partition where the runtime has one and is
        updated by the runtime from each update's ``num_examples`` (the count the client
        reports) before :meth:`aggregate`."""
        if weighting == "uniform":
            return {c: 1.0 / len(clients) for c in clients}
        total = sum(self.ctx.num_examples[c] for c in clients)
        return {c: self.ctx.num_examples[c] / total for c in clients}

    def client_mean(self, tensors: Mapping[int, Mapping[str, torch.Tensor]]) -> Tensors:
        """Key-wise mean of the given clients' tensors, weighted by :meth:`weights` under the
        options' ``weighting`` field (``examples`` for options without one): FedAvg's aggregate."""
        weighting: str = getattr(self.options, "weighting", "examples")
        return weighted_mean(tensors, self.weights(list(tensors), weighting))


def weighted_mean(updates: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float]) -> Tensors:
    """Key-wise weighted mean of client tensors; weights are normalised over the clients given.

    Every client must upload the same keys with the same shapes.
    """
    clients = list(updates)
    if not clients:
        return {}
    keys = list(updates[clients[0]])
    total = sum(weights[c] for c in clients)
    out: Tensors = {}
    for key in keys:
        stacked = torch.stack([updates[c][key].float() for c in clients])
        w = torch.tensor([weights[c] / total for c in clients], dtype=stacked.dtype)
        out[key] = torch.tensordot(w, stacked, dims=1)
    return out


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"algorithm {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an algorithm from the registry (a plug-in or a test double that must not outlive its use)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Algorithm]]:
    return dict(sorted(_REGISTRY.items()))


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FedLoraError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def parse_options(cls: type[Algorithm], raw: Mapping[str, Any]) -> Options:
    """Build ``cls.options_class`` from the ``[algorithm]`` table, with clear errors."""
    fields = {f.name: f for f in dataclasses.fields(cls.options_class)}
    for old, new in cls.options_class.renamed.items():
        if old in raw and old not in fields and new in fields:
            raise FedLoraError(f"algorithm.{old} is now called algorithm.{new} (same meaning): rename the key")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise FedLoraError(f"algorithm {cls.name!r} has no option {', '.join(unknown)}; its options: {valid}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(cls.options_class(), key)
        values[key] = _coerce(f"algorithm.{key}", value, default)
    try:
        return cls.options_class(**values)
    except (TypeError, ValueError) as exc:
        raise FedLoraError(f"algorithm {cls.name!r}: {exc}") from None


def _coerce(name: str, value: Any, default: Any) -> Any:
    if default is None or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise FedLoraError(f"{name} = {value!r}: expected {type(default).__name__} like {default!r}")
