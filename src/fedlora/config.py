"""Run configuration: one TOML file, every key overridable with ``--set section.key=value``.

The file is read into typed dataclasses; an unknown section or key, a value of the wrong
type or out of range gives one :class:`~fedlora.errors.FedLoraError` naming the key and
what to do. ``[algorithm]`` holds ``name`` plus that algorithm's own options, checked
against the algorithm's options class.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from fedlora.errors import FedLoraError


@dataclass
class RunConfig:
    name: str = "fedlora"
    seed: int = 0
    rounds: int = 5
    out: str = "runs"
    device: str = "cpu"


@dataclass
class ModelConfig:
    name: str = "minilm-l6"
    head: str = "frozen"
    head_init_std: float = 0.02
    target_modules: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    ranks: list[int] = field(default_factory=list)
    rank_assignment: str = "round_robin"
    quantization: str = "none"


@dataclass
class DataConfig:
    dataset: str = "rotten_tomatoes"
    partition: str = "dirichlet"
    alpha: float = 0.5
    num_clients: int = 10
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    max_train_per_client: int = 0
    max_test_per_client: int = 0
    max_length: int = 64
    min_partition_size: int = 10
    classes_per_client: int = 2
    partition_by: str = "client"


@dataclass
class TrainConfig:
    local_steps: int = 10
    local_epochs: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    precision: str = "fp32"
    gradient_checkpointing: bool = False


@dataclass
class FederationConfig:
    fraction: float = 1.0
    min_clients: int = 1
    on_client_error: str = "skip"
    round_retries: int = 0
    clip_update_norm: float = 0.0


#: Values of ``eval.personalized``: when a sampled client is scored on its own test split.
PERSONALIZED_PROTOCOLS = ("received", "trained", "both")


@dataclass
class EvalConfig:
    every: int = 1
    personalized: str = "both"
    max_new_tokens: int = 32


@dataclass
class PrivacyConfig:
    mode: str = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float = 0.0
    secure_aggregation: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "fedit"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def algorithm_name(self) -> str:
        return str(self.algorithm.get("name", "fedit"))

    @property
    def algorithm_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.algorithm.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(name: str, value: Any, expected: Any) -> Any:
    origin = getattr(expected, "__origin__", None)
    if origin is list:
        (item_type,) = expected.__args__
        if not isinstance(value, list):
            raise FedLoraError(f"{name} = {value!r}: expected a list")
        return [_check_type(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and isinstance(value, bool):
        return value
    if isinstance(value, bool) and expected is not bool:
        raise FedLoraError(f"{name} = {value!r}: expected {expected.__name__}")
    if not isinstance(value, expected):
        raise FedLoraError(f"{name} = {value!r}: expected {expected.__name__}")
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML table."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise FedLoraError(f"unknown config section [{unknown[0]}]; sections: {', '.join(_SECTIONS)}")
    config = Config()
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise FedLoraError(f"[{section}] must be a table of keys")
        if section == "algorithm":
            name = table.get("name", "fedit")
            if not isinstance(name, str):
                raise FedLoraError(f"algorithm.name = {name!r}: expected a string")
            config.algorithm = {**table, "name": name}
            continue
        target = getattr(config, section)
        hints = get_type_hints(type(target))
        for key, value in table.items():
            if key not in hints:
                raise FedLoraError(f"unknown key {section}.{key}; [{section}] keys: {', '.join(hints)}")
            setattr(target, key, _check_type(f"{section}.{key}", value, hints[key]))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that need no model or data."""
    checks: list[tuple[bool, str]] = [
        (config.run.rounds >= 1, "run.rounds must be >= 1"),
        (
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", config.run.device) is not None,
            f"run.device = {config.run.device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'",
        ),
        (config.model.rank >= 1, "model.rank must be >= 1"),
        (config.model.alpha > 0, "model.alpha must be > 0"),
        (
            0.0 <= config.model.lora_dropout < 1.0,
            f"model.lora_dropout = {config.model.lora_dropout}: use a probability in [0, 1) (0 disables it)",
        ),
        (all(r >= 1 for r in config.model.ranks), "model.ranks must all be >= 1"),
        (config.model.head in ("frozen", "local", "federated"), "model.head must be 'frozen', 'local' or 'federated'"),
        (config.model.head_init_std > 0, f"model.head_init_std = {config.model.head_init_std}: use a value > 0"),
        (
            config.model.rank_assignment in ("list", "round_robin", "random"),
            "model.rank_assignment must be 'list', 'round_robin' or 'random'",
        ),
        (
            config.model.quantization in ("none", "nf4", "int8"),
            f"model.quantization = {config.model.quantization!r}: use 'none', 'nf4' (4-bit NormalFloat) or "
            "'int8' (8-bit absmax) for the frozen base weights",
        ),
        (config.data.alpha > 0, f"data.alpha = {config.data.alpha}: the Dirichlet concentration must be > 0"),
        (config.data.num_clients >= 1, "data.num_clients must be >= 1"),
        (0 <= config.data.test_fraction < 1, "data.test_fraction must be in [0, 1)"),
        (
            0 <= config.data.validation_fraction < 1,
            f"data.validation_fraction = {config.data.validation_fraction}: use a value in [0, 1) (0 = no carve-out)",
        ),
        (config.data.max_train_per_client >= 0, "data.max_train_per_client must be >= 0 (0 = no cap)"),
        (config.data.max_test_per_client >= 0, "data.max_test_per_client must be >= 0 (0 = no cap)"),
        (config.data.max_length >= 8, "data.max_length must be >= 8 tokens"),
        (config.data.min_partition_size >= 0, "data.min_partition_size must be >= 0"),
        (config.data.classes_per_client >= 1, "data.classes_per_client must be >= 1"),
        (
            config.train.local_steps >= 0 and config.train.local_epochs >= 0,
            "train.local_steps/local_epochs must be >= 0",
        ),
        (
            (config.train.local_steps > 0) != (config.train.local_epochs > 0),
            "set exactly one of train.local_steps and train.local_epochs (the other 0)",
        ),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (
            config.train.precision in ("fp32", "bf16", "fp16"),
            f"train.precision = {config.train.precision!r}: use 'fp32', 'bf16' or 'fp16'",
        ),
        (config.train.lr > 0, "train.lr must be > 0"),
        (config.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 < config.federation.fraction <= 1, f"federation.fraction = {config.federation.fraction}: must be in (0, 1]"),
        (config.federation.min_clients >= 1, "federation.min_clients must be >= 1"),
        (
            config.federation.on_client_error in ("skip", "fail"),
            f"federation.on_client_error = {config.federation.on_client_error!r}: use 'skip' (drop the client's "
            "update and continue) or 'fail' (stop the run)",
        ),
        (config.federation.round_retries >= 0, "federation.round_retries must be >= 0 (0 = stop at once)"),
        (
            config.federation.clip_update_norm == 0 or config.federation.clip_update_norm >= 1,
            f"federation.clip_update_norm = {config.federation.clip_update_norm}: use 0 (off) or a multiple >= 1 "
            "of the round's median update norm, e.g. 3",
        ),
        (config.eval.every >= 0, "eval.every must be >= 0 (0 = never evaluate)"),
        (
            config.eval.personalized in PERSONALIZED_PROTOCOLS,
            f"eval.personalized = {config.eval.personalized!r}: use 'received' (score each client on the model it "
            "is sent, before local training), 'trained' (after local training) or 'both'",
        ),
        (config.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1 (tokens generated per answer)"),
    ]
    for ok, message in checks:
        if not ok:
            raise FedLoraError(message)
    validate_privacy(config.privacy)
    if (
        config.model.rank_assignment == "list"
        and config.model.ranks
        and len(config.model.ranks) != config.data.num_clients
    ):
        raise FedLoraError(
            f"model.ranks has {len(config.model.ranks)} entries but data.num_clients = {config.data.num_clients}; "
            "give one rank per client, or use rank_assignment = 'round_robin' / 'random'"
        )


def validate_privacy(p: PrivacyConfig) -> None:
    """Range checks of ``[privacy]`` (see docs/privacy.md)."""
    checks: list[tuple[bool, str]] = [
        (
            p.mode in ("off", "central", "local"),
            f"privacy.mode = {p.mode!r}: use 'off', 'central' (the server clips and adds the noise) or 'local' "
            "(each client clips and noises its own update)",
        ),
        (p.clip_norm > 0, f"privacy.clip_norm = {p.clip_norm}: the L2 bound of an update's change must be > 0"),
        (p.noise_multiplier >= 0, "privacy.noise_multiplier must be >= 0 (noise std = noise_multiplier * clip_norm)"),
        (
            math.isfinite(p.clip_norm) or (p.noise_multiplier == 0 and p.target_epsilon == 0),
            "privacy.clip_norm = inf bounds nothing, so no noise can protect the updates; set a finite clip_norm",
        ),
        (p.target_epsilon >= 0, "privacy.target_epsilon must be >= 0 (0 = set privacy.noise_multiplier yourself)"),
        (0 < p.delta < 1, f"privacy.delta = {p.delta}: must be in (0, 1), e.g. 1e-5 (below 1 / number of clients)"),
        (0 < p.target_quantile < 1, "privacy.target_quantile must be in (0, 1) (fraction of updates left unclipped)"),
        (p.clip_lr > 0, "privacy.clip_lr must be > 0 (step of the geometric clip-norm update)"),
        (p.clipped_count_stddev >= 0, "privacy.clipped_count_stddev must be >= 0 (0 = sampled clients / 20)"),
        (
            not (p.target_epsilon > 0 and p.noise_multiplier > 0),
            "set either privacy.target_epsilon (the noise multiplier is then calibrated to it) or "
            "privacy.noise_multiplier, not both",
        ),
        (
            not (p.mode == "off" and p.target_epsilon > 0),
            "privacy.target_epsilon needs privacy.mode = 'central' or 'local'",
        ),
        (
            not (p.mode == "local" and p.adaptive_clip),
            "privacy.adaptive_clip needs privacy.mode = 'central': the server adapts the bound from the clients' "
            "update norms, which local DP never shows it",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise FedLoraError(message)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise FedLoraError(f"--set {text!r}: expected section.key=value, e.g. train.lr=0.001")
    path, value_text = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return section, key, value


def load_config(path: Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or start from defaults) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise FedLoraError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise FedLoraError(f"config file {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedLoraError(f"config file {path} is not valid TOML: {exc}") from None
    for text in overrides or []:
        section, key, value = parse_override(text)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise FedLoraError(f"--set {text!r}: [{section}] is not a table")
        table[key] = value
    return from_dict(raw)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a two-level table (sections of scalars and lists) as TOML."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
