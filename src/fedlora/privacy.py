"""Client-level differential privacy: clipping of each upload's change, Gaussian noise, an accountant.

A client's *change* is what it uploads minus what it received (its reference: the
payload over its private state, the state it started training from), over all its
uploaded tensors together (the federated head included). Every change is bounded in L2 norm by
``C`` (``privacy.clip_norm``): ``reference + change * min(1, C / ||change||)``.

``privacy.mode``:

``central`` (DP-FedAvg, McMahan et al. 2018)
    The server clips every upload and adds Gaussian noise of standard deviation
    ``sigma * C`` to the *sum* of the round's changes. So that this works for every
    algorithm without touching its ``aggregate``, the server draws the sum's noise as
    ``n`` independent parts, ``N(0, sigma^2 C^2 / n)`` on each of the ``n`` aggregated
    uploads (their sum is ``N(0, sigma^2 C^2)`` exactly). An algorithm whose aggregate is
    the uniform mean of the uploads (``weighting = "uniform"``: the denominator is the
    number of aggregated clients, not a data-dependent weight) then releases
    ``mean(clipped changes) + N(0, (sigma C / n)^2)`` over the common reference: the
    Gaussian mechanism on a sum of sensitivity ``C``. Example weights would give one
    client a sensitivity ``q_k C`` larger than ``C / n``, so central mode refuses them.
    With ``adaptive_clip`` the bound follows the quantile rule of Andrew et al. (2021):
    ``C <- C exp(-clip_lr (b - target_quantile))``, ``b`` the noisy fraction of unclipped
    updates, whose count gets noise ``clipped_count_stddev``; the update noise multiplier
    is lowered to ``(sigma^-2 - (2 sigma_b)^-2)^-1/2`` so that both releases together cost
    what ``sigma`` alone would.
``local``
    Each client clips its own change and adds ``N(0, sigma^2 C^2)`` to it before upload
    (:class:`LocalNoise`, applied at the end of ``client_round``); the server sees only noised updates.

The accountant is Opacus' RDP accountant (Mironov 2017; Poisson-subsampled Gaussian).
Central: one step per round at sampling rate ``q = clients per round / clients`` (our
sampling draws a fixed number without replacement; like DP-FedAvg's own analysis we
account it as Poisson sampling at that rate). Local: a client's epsilon composes the
unsampled Gaussian mechanism over the rounds it took part in (the server knows who was
sampled, so sampling does not amplify); the reported value is the largest over clients.
``privacy.target_epsilon`` calibrates ``sigma`` before the first round so that the last
round's epsilon is at most the target (Opacus' ``get_noise_multiplier``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlora.algorithms.base import Tensors
from fedlora.config import Config, PrivacyConfig
from fedlora.errors import FedLoraError
from fedlora.seeds import derive_seed

__all__ = [
    "CENTRAL_DP_COVERED",
    "LocalNoise",
    "PrivacyEngine",
    "change_norm",
    "clip_change",
    "epsilon",
    "gaussian_noise",
    "local_noise",
    "noise_multiplier_for",
]


#: Algorithms whose every release (what the server sends back) is a uniform mean over all the
#: round's uploads, so that central mode's noise gives them the DP-FedAvg guarantee. The others
#: release means over subsets (clusters, leave-one-out), products or stacks of the individual
#: noised uploads: central mode runs, but its epsilon is nominal for them (docs/privacy.md).
CENTRAL_DP_COVERED = frozenset(
    {
        "fedit",
        "ffa",
        "fedsa",
        "sharedepth",
        "zeropad",
        "feddpa",
        "local",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
    }
)


def change_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``tensors - reference`` over all keys together."""
    squares = sum(float(((tensors[k].double() - reference[k].double()) ** 2).sum()) for k in tensors)
    return math.sqrt(squares)


def clip_change(
    tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], bound: float
) -> tuple[Tensors, float]:
    """Bound the change ``tensors - reference`` at L2 norm ``bound``.

    Returns the tensors (unchanged, the same objects, when the change is within the
    bound) and the change's norm before clipping.
    """
    norm = change_norm(tensors, reference)
    if norm <= bound:
        return dict(tensors), norm
    scale = bound / norm
    return {k: reference[k] + (v - reference[k]) * scale for k, v in tensors.items()}, norm


def gaussian_noise(tensors: Mapping[str, torch.Tensor], std: float, seed: int) -> Tensors:
    """``tensors`` plus independent ``N(0, std^2)`` noise on every element, drawn from ``seed``.

    ``std = 0`` returns the tensors unchanged.
    """
    if std == 0:
        return dict(tensors)
    gen = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for key in sorted(tensors):
        value = tensors[key]
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float64) * std
        out[key] = (value.double() + noise).to(value.dtype)
    return out


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float | None:
    """(epsilon, ``delta``)-DP of ``steps`` Poisson-subsampled Gaussian mechanisms (Opacus RDP).

    ``None`` when there is no finite guarantee (no noise); 0 before the first step.
    """
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return None
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=32)
def noise_multiplier_for(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) with epsilon <= ``target_epsilon`` after ``steps``."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.001 * target_epsilon,
            )
        )
    except ValueError as exc:
        raise FedLoraError(
            f"privacy.target_epsilon = {target_epsilon} cannot be reached over {steps} rounds at sampling rate "
            f"{sample_rate:.3g} and delta = {delta} ({exc}); raise the target, or run fewer rounds"
        ) from None


def local_noise_multiplier(config: PrivacyConfig, rounds: int) -> float:
    """Local mode's sigma: ``noise_multiplier``, or calibrated to ``target_epsilon`` over every round, unsampled."""
    if config.target_epsilon > 0:
        return noise_multiplier_for(config.target_epsilon, 1.0, rounds, config.delta)
    return config.noise_multiplier


@dataclass(frozen=True)
class LocalNoise:
    """A client's own clipping and noise (``privacy.mode = "local"``), built from the run config alone.

    A Flower node builds it from the config it is sent, the simulator from its own: both
    add the same noise, drawn from ``(seed, round, client)``.
    """

    clip_norm: float
    noise_multiplier: float
    seed: int

    def apply(
        self,
        rnd: int,
        client: int,
        upload: Tensors,
        head_upload: Tensors,
        start: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        """Clip the change of adapters and head together (from ``start``, the state the client
        trained from) at ``clip_norm`` and add ``N(0, (noise_multiplier * clip_norm)^2)``.
        Returns (adapters, head)."""
        everything = {**upload, **head_upload}
        clipped, _ = clip_change(everything, {k: start[k] for k in everything}, self.clip_norm)
        std = _std(self.noise_multiplier, self.clip_norm)
        noised = gaussian_noise(clipped, std, derive_seed(self.seed, rnd, "privacy", client))
        return {k: noised[k] for k in upload}, {k: noised[k] for k in head_upload}


def local_noise(config: Config) -> LocalNoise | None:
    """The client side of ``[privacy]``: a :class:`LocalNoise` in local mode, else ``None``."""
    if config.privacy.mode != "local":
        return None
    sigma = local_noise_multiplier(config.privacy, config.run.rounds)
    return LocalNoise(config.privacy.clip_norm, sigma, config.run.seed)


def _std(noise_multiplier: float, clip_norm: float) -> float:
    """``noise_multiplier * clip_norm``, 0 without noise (also for an unbounded ``clip_norm``)."""
    return noise_multiplier * clip_norm if noise_multiplier > 0 else 0.0


@dataclass
class RoundRecord:
    """What a round's privacy step did, for the round's metrics row."""

    clip_norm: float
    noise_multiplier: float
    clipped: int
    epsilon: float | None
    delta: float

    def row(self) -> dict[str, Any]:
        return {
            "dp_epsilon": self.epsilon,
            "dp_delta": self.delta,
            "dp_clip_norm": self.clip_norm if math.isfinite(self.clip_norm) else None,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clipped": self.clipped,
        }


@dataclass
class PrivacyEngine:
    """The server's side of ``[privacy]``: clipping, central noise, adaptive bound and accountant.

    Parameters
    ----------
    config
        The ``[privacy]`` section.
    num_clients, clients_per_round, rounds, seed
        The federation's size, the number of clients sampled per round, the run length
        and the run seed (noise is drawn from ``(seed, round, client)``).
    """

    config: PrivacyConfig
    num_clients: int
    clients_per_round: int
    rounds: int
    seed: int
    noise_multiplier: float = field(init=False)
    calibrated: bool = field(init=False)
    clip_norm: float = field(init=False)
    steps: int = 0
    participation: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        self.clip_norm = cfg.clip_norm
        self.calibrated = cfg.target_epsilon > 0
        if cfg.mode == "local":
            self.noise_multiplier = local_noise_multiplier(cfg, self.rounds)
        elif self.calibrated:
            self.noise_multiplier = noise_multiplier_for(cfg.target_epsilon, self.sample_rate, self.rounds, cfg.delta)
        else:
            self.noise_multiplier = cfg.noise_multiplier

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    @property
    def central(self) -> bool:
        return self.config.mode == "central"

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def count_stddev(self) -> float:
        """Noise std of the adaptive rule's unclipped count (default: clients per round / 20, as Flower)."""
        return self.config.clipped_count_stddev or self.clients_per_round / 20

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier of the updates; lower than the total under adaptive clipping (Andrew et al.)."""
        z = self.noise_multiplier
        if not (self.central and self.config.adaptive_clip) or z == 0:
            return z
        if z >= 2 * self.count_stddev:
            raise FedLoraError(
                f"adaptive clipping with noise_multiplier {z:.3g} needs privacy.clipped_count_stddev > {z / 2:.3g} "
                f"(it is {self.count_stddev:.3g}); raise it or lower the noise"
            )
        return float((z**-2 - (2 * self.count_stddev) ** -2) ** -0.5)

    def check_weighting(self, algorithm_name: str, options: object) -> None:
        """Central noise is calibrated to a uniform mean: refuse data-dependent aggregation weights."""
        weighting = getattr(options, "weighting", None)
        if self.central and weighting not in (None, "uniform"):
            raise FedLoraError(
                f"privacy.mode = 'central' adds the noise of a uniform mean over the round's clients (DP-FedAvg), "
                f"but {algorithm_name} weights clients by {weighting!r}, which gives one client more influence than "
                "the noise covers; set algorithm.weighting = 'uniform'"
            )

    def process(
        self,
        rnd: int,
        uploads: Mapping[int, Tensors],
        references: Mapping[int, Mapping[str, torch.Tensor]],
        hook_uploads: Mapping[int, Tensors] | None = None,
    ) -> tuple[dict[int, Tensors], RoundRecord]:
        """One round on the server: central clipping and noise (none in local mode) and the accountant's step.

        ``hook_uploads`` (what client hooks upload beside the model, e.g. SCAFFOLD's control
        variates) are not covered by the clipping and noise: a round that has any is refused.
        """
        if any(hook_uploads.values() if hook_uploads else ()):
            raise FedLoraError(
                "[privacy] clips and noises the model's upload only, but this algorithm's clients also upload hook "
                "tensors (e.g. SCAFFOLD's control variates), which would leave unprotected; run it without "
                "privacy.mode, or use a method without uploaded hook tensors"
            )
        out = dict(uploads)
        clipped = 0
        bound = self.clip_norm
        if self.central:
            unclipped = 0
            for cid in sorted(uploads):
                out[cid], norm = clip_change(uploads[cid], references[cid], bound)
                clipped += norm > bound
                unclipped += norm <= bound
            std = _std(self.update_noise_multiplier, bound) / math.sqrt(max(len(out), 1))
            out = {cid: gaussian_noise(t, std, derive_seed(self.seed, rnd, "privacy", cid)) for cid, t in out.items()}
            if self.config.adaptive_clip and out:
                self._adapt(rnd, unclipped, len(out))
        for cid in uploads:
            self.participation[cid] = self.participation.get(cid, 0) + 1
        self.steps += 1
        return out, RoundRecord(bound, self.noise_multiplier, clipped, self.epsilon(), self.config.delta)

    def _adapt(self, rnd: int, unclipped: int, n: int) -> None:
        rng = np.random.default_rng(derive_seed(self.seed, rnd, "privacy", "count"))
        noisy = (unclipped + (rng.normal(0.0, self.count_stddev) if self.noise_multiplier > 0 else 0.0)) / n
        self.clip_norm *= math.exp(-self.config.clip_lr * (noisy - self.config.target_quantile))

    def epsilon(self) -> float | None:
        """The run's epsilon so far (at ``privacy.delta``)."""
        if self.central:
            return epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.config.delta)
        most = max(self.participation.values(), default=0)
        return epsilon(self.noise_multiplier, 1.0, most, self.config.delta)

    def guarantee(self, algorithm_name: str) -> str:
        """What the reported epsilon means for ``algorithm_name`` (the ``guarantee`` of ``summary.json``)."""
        if self.config.mode == "local":
            return "local: every upload is clipped and noised by its client; epsilon per client"
        if algorithm_name in CENTRAL_DP_COVERED:
            return "central: client-level DP of the released uniform mean (DP-FedAvg)"
        return (
            f"nominal: {algorithm_name} releases more than the uniform mean of all uploads (subset means, "
            "products or stacks), which the central noise does not fully cover; see docs/privacy.md"
        )

    def summary(self, algorithm_name: str) -> dict[str, Any]:
        """The ``privacy`` entry of ``summary.json``."""
        cfg = self.config
        return {
            "mode": cfg.mode,
            "guarantee": self.guarantee(algorithm_name),
            "epsilon": self.epsilon(),
            "delta": cfg.delta,
            "noise_multiplier": self.noise_multiplier,
            "calibrated_to_target_epsilon": cfg.target_epsilon if self.calibrated else None,
            "sample_rate": self.sample_rate if self.central else 1.0,
            "clip_norm_final": self.clip_norm if math.isfinite(self.clip_norm) else None,
            "adaptive_clip": cfg.adaptive_clip,
            "accountant": "opacus RDP",
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints (the adapted bound, steps and participation)."""
        return {
            "clip_norm": self.clip_norm if math.isfinite(self.clip_norm) else None,
            "steps": self.steps,
            "participation": {str(c): n for c, n in self.participation.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        clip = state["clip_norm"]
        self.clip_norm = math.inf if clip is None else float(clip)
        self.steps = int(state["steps"])
        self.participation = {int(c): int(n) for c, n in state["participation"].items()}
