"""The embedded simulator: every client of a federation in one process.

One base model stays in memory; each client's adapters are copied in and out (see
``fedlora.client``). Runs are deterministic for a seed: client sampling, batch order,
LoRA init and dropout all derive from ``(seed, round, client)``, so a run resumed from a
checkpoint gives bit-identical metrics.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedlora.accel import MemoryMeter, prepare_model, resolve_device
from fedlora.algorithms import Algorithm, FederationContext, Payload, Update, get_algorithm, parse_options
from fedlora.algorithms.base import LAMBDA_REPORT, Tensors
from fedlora.checkpoint import list_checkpoints, read_checkpoint, select_checkpoint, write_atomic, write_checkpoint
from fedlora.client import HOOK_STATE, ClientContext, ClientOutcome, ClientRunner, EvalResult, client_round
from fedlora.config import Config
from fedlora.data import ClientSplit, TextDataset, TokenizedCorpus, load_dataset, partition, split_clients
from fedlora.errors import FedLoraError
from fedlora.generation import GenerationObjective, InstructCorpus
from fedlora.heads import HeadPolicy, is_head_key
from fedlora.lora import LoraModel, init_state
from fedlora.metrics import (
    RECEIVED,
    MetricsLog,
    aggregate_rows,
    best_round,
    client_lambdas,
    last_evaluations,
    round_aggregate,
)
from fedlora.models import LoadedModel, load_model
from fedlora.privacy import LocalNoise, PrivacyEngine, local_noise
from fedlora.seeds import derive_seed
from fedlora.store import ClientStore
from fedlora.tasks import ClassificationObjective, Corpus, Objective, task_for
from fedlora.traffic import bytes_down, bytes_up
from fedlora.validation import clip_to_median, expected_upload, non_finite_keys, update_problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"
CLIENT_STATE = "clients"
KEEP_CHECKPOINTS = 2


def resolve_ranks(config: Config, client_ids: Sequence[int]) -> dict[int, int]:
    """Each client's LoRA rank: one rank for all, or ``model.ranks`` assigned per client."""
    ranks = config.model.ranks
    if not ranks:
        return {c: config.model.rank for c in client_ids}
    mode = config.model.rank_assignment
    if mode == "list":
        return {c: ranks[i] for i, c in enumerate(client_ids)}
    if mode == "round_robin":
        return {c: ranks[i % len(ranks)] for i, c in enumerate(client_ids)}
    rng = np.random.default_rng(derive_seed(config.run.seed, "ranks"))
    return {c: int(rng.choice(ranks)) for c in client_ids}


def sample_clients(config: Config, client_ids: Sequence[int], rnd: int, attempt: int = 0) -> list[int]:
    """The clients of round ``rnd``: a seeded sample of ``fraction`` of them, at least ``min_clients``.

    ``attempt`` > 0 draws the fresh sample of a retried round (``federation.round_retries``).
    """
    if config.federation.min_clients > len(client_ids):
        raise FedLoraError(
            f"federation.min_clients = {config.federation.min_clients} but the federation has {len(client_ids)} clients"
        )
    m = clients_per_round(config, len(client_ids))
    if m == len(client_ids):
        return list(client_ids)
    parts: tuple[object, ...] = (rnd, "sample") if attempt == 0 else (rnd, "sample", attempt)
    rng = np.random.default_rng(derive_seed(config.run.seed, *parts))
    return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=m, replace=False))


def clients_per_round(config: Config, num_clients: int) -> int:
    """How many clients a round samples: ``fraction`` of them, at least ``min_clients``, at most all."""
    return min(num_clients, max(config.federation.min_clients, round(config.federation.fraction * num_clients)))


@dataclass
class Federation:
    """Everything a run needs before its first round: data, splits, model, algorithm."""

    config: Config
    dataset: TextDataset
    #: Row of ``dataset`` for each corpus row; ``splits`` index the corpus.
    dataset_index: np.ndarray
    splits: list[ClientSplit]
    loaded: LoadedModel
    lora_model: LoraModel
    corpus: Corpus
    ctx: FederationContext
    algorithm: Algorithm
    head: HeadPolicy
    runner: ClientRunner
    privacy: PrivacyEngine
    test_union: np.ndarray = field(init=False)
    local_dp: LocalNoise | None = field(init=False)

    def __post_init__(self) -> None:
        self.local_dp = local_noise(self.config)
        self.test_union = np.concatenate([s.test for s in self.splits]) if self.splits else np.array([], dtype=np.int64)

    @property
    def client_ids(self) -> list[int]:
        return self.ctx.client_ids

    def client_context(self, cid: int) -> ClientContext:
        """What client ``cid`` needs for a round: the shared runner and its own split."""
        split = self.splits[cid]
        return ClientContext(
            cid,
            self.runner,
            split.train,
            split.test,
            self.config.model.head,
            self.config.eval.personalized,
            self.algorithm.client_hooks,
            self.local_dp,
        )


def client_splits(config: Config, dataset: TextDataset) -> list[ClientSplit]:
    """Partition a data set into the config's clients and split each into train and test.

    With ``data.validation_fraction > 0`` the returned ``test`` of each client is a
    validation split carved from its training examples (after the caps) instead."""
    d = config.data
    if d.num_clients > len(dataset.texts):
        raise FedLoraError(
            f"data.num_clients = {d.num_clients} but {dataset.name} has only {len(dataset.texts)} examples"
        )
    parts = partition(
        dataset,
        method=d.partition,
        num_clients=d.num_clients,
        seed=config.run.seed,
        alpha=d.alpha,
        min_size=d.min_partition_size,
        classes_per_client=d.classes_per_client,
        by=d.partition_by,
    )
    splits = split_clients(
        parts,
        test_fraction=d.test_fraction,
        seed=config.run.seed,
        max_train=d.max_train_per_client or None,
        max_test=d.max_test_per_client or None,
    )
    if d.validation_fraction > 0:
        # Tuning: each client's evaluation split is carved from its own training examples,
        # so the test split is never read.
        splits = split_clients(
            [s.train for s in splits],
            test_fraction=d.validation_fraction,
            seed=config.run.seed,
            max_test=d.max_test_per_client or None,
        )
    empty = [i for i, s in enumerate(splits) if len(s.train) == 0]
    if empty:
        raise FedLoraError(
            f"clients {empty[:5]} have no training examples; use fewer clients or a larger min_partition_size"
        )
    return splits


def load_lora_model(
    config: Config, dataset: TextDataset, num_labels: int | None = None
) -> tuple[LoadedModel, LoraModel]:
    """The config's model for ``dataset``'s task (``num_labels`` classes, by default the data
    set's), with its seeded head and LoRA injected in the target modules."""
    task = task_for(dataset)
    if task == "causal_lm" and config.model.head != "frozen":
        raise FedLoraError(
            f"model.head = {config.model.head!r} applies to classification; {dataset.name} trains a causal LM "
            "(no classification head): leave model.head = 'frozen'"
        )
    num_labels = (num_labels or len(dataset.label_names)) if task == "classification" else None
    loaded = load_model(
        config.model.name,
        task=task,
        num_labels=num_labels,
        head_seed=config.run.seed,
        head_init_std=config.model.head_init_std,
    )
    targets = config.model.target_modules or list(loaded.default_targets)
    lora_model = prepare_model(
        loaded,
        targets,
        device=resolve_device(config.run.device),
        precision=config.train.precision,
        quantization=config.model.quantization,
        gradient_checkpointing=config.train.gradient_checkpointing,
        lora_dropout=config.model.lora_dropout,
    )
    return loaded, lora_model


def build_objective(
    dataset: TextDataset, rows: np.ndarray, tokenizer: PreTrainedTokenizerBase, config: Config
) -> Objective:
    """Tokenize ``dataset``'s ``rows`` once for the data set's task and return its objective.

    Row ``i`` of the objective's corpus is ``dataset`` row ``rows[i]``.
    """
    max_length = config.data.max_length
    if task_for(dataset) == "classification":
        corpus = TokenizedCorpus([dataset.texts[i] for i in rows], dataset.labels[rows], tokenizer, max_length)
        return ClassificationObjective(corpus)
    columns = dataset.columns
    instruct = InstructCorpus(
        [columns["instruction"][i] for i in rows],
        [columns["input"][i] for i in rows],
        [columns["output"][i] for i in rows],
        [dataset.label_names[k] for k in dataset.labels[rows]],
        tokenizer,
        max_length,
    )
    return GenerationObjective(instruct, tokenizer, config.eval.max_new_tokens)


def make_runner(
    config: Config, dataset: TextDataset, rows: np.ndarray, loaded: LoadedModel, lora_model: LoraModel
) -> ClientRunner:
    """A runner over ``dataset``'s ``rows`` (tokenized once; corpus row ``i`` is ``rows[i]``)."""
    objective = build_objective(dataset, rows, loaded.tokenizer, config)
    objective.device = resolve_device(config.run.device)
    head_init = lora_model.head_state()
    trainable = HeadPolicy(config.model.head, head_init).trainable
    return ClientRunner(lora_model, objective, config.train, config.run.seed, head_init, trainable)


def build_federation(config: Config) -> Federation:
    """Load data and model, partition, tokenize once, and build the algorithm."""
    algorithm_cls = get_algorithm(config.algorithm_name)
    options = parse_options(algorithm_cls, config.algorithm_options)
    dataset = load_dataset(config.data.dataset)
    splits = client_splits(config, dataset)
    loaded, lora_model = load_lora_model(config, dataset)
    # Tokenize once, and only the examples some client uses (caps can leave most out).
    used = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits]))
    splits = [ClientSplit(np.searchsorted(used, s.train), np.searchsorted(used, s.test)) for s in splits]
    runner = make_runner(config, dataset, used, loaded, lora_model)
    client_ids = list(range(len(splits)))
    ctx = FederationContext(
        client_ids=client_ids,
        num_examples={c: len(splits[c].train) for c in client_ids},
        module_shapes=dict(lora_model.shapes),
        rank=config.model.rank,
        alpha=config.model.alpha,
        ranks=resolve_ranks(config, client_ids),
        seed=config.run.seed,
        rounds=config.run.rounds,
        lr=config.train.lr,
    )
    algorithm = algorithm_cls(ctx, options)
    privacy = PrivacyEngine(
        config.privacy,
        len(client_ids),
        clients_per_round(config, len(client_ids)),
        config.run.rounds,
        config.run.seed,
    )
    privacy.check_weighting(config.algorithm_name, options)
    head = HeadPolicy(config.model.head, runner.head_init)
    return Federation(
        config,
        dataset,
        used,
        splits,
        loaded,
        lora_model,
        runner.objective.corpus,
        ctx,
        algorithm,
        head,
        runner,
        privacy,
    )


@dataclass
class ClientFailure:
    """Why a client's round produced no update: an exception, no reply, or a rejected update."""

    error: str
    """The exception type (``RejectedUpdate`` for a failed validation, ``NoReply`` for silence)."""
    message: str
    exception: BaseException | None = None

    def record(self) -> dict[str, str]:
        """The ``error`` and ``message`` fields of a failure row."""
        return {"error": self.error, "message": self.message}


def hook_keys(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Hook tensors under the ``hook/`` prefix, so that they are validated beside the model's."""
    return {f"{HOOK_STATE}{k}": v for k, v in tensors.items()}


ProgressHook = Callable[[int, int | None], None]


class Simulation:
    """Run a federation round by round, writing the output contract into ``out_dir``.

    Parameters
    ----------
    config
        The resolved run configuration.
    out_dir
        The run directory (config.toml, metrics.jsonl, summary.json, checkpoints/, plots/).
    on_progress
        Called with ``(round, client)`` after each client's local work and with
        ``(round, None)`` after each round, for progress bars.
    """

    #: Whether this runtime can aggregate without seeing individual updates (Flower's SecAgg+ run).
    secure_aggregation = False

    def __init__(self, config: Config, out_dir: Path, on_progress: ProgressHook | None = None) -> None:
        if config.privacy.secure_aggregation and not self.secure_aggregation:
            raise FedLoraError(
                "privacy.secure_aggregation runs on Flower (SecAgg+ between separate nodes): use "
                "'fedlora flower simulate' or a deployment; the simulator has no server to hide updates from"
            )
        self.config = config
        self.out_dir = out_dir
        self.on_progress = on_progress
        self.fed = build_federation(config)
        self.store = ClientStore(out_dir / CLIENT_STATE)
        self.log = MetricsLog(out_dir / "metrics.jsonl")
        self.next_round = 0
        self.elapsed = 0.0
        self.trainable_params = 0
        self.restored_from: Path | None = None
        #: Each client's latest reported mixing weights (``lambda/<module>`` update metrics).
        self.reported: dict[int, dict[str, float]] = {}
        self.memory = MemoryMeter(self.fed.runner.objective.device)

    # --- one round --------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict[str, Any]:
        """Run round ``rnd``: clients, validation, aggregation, evaluation, metrics, checkpoint.

        A client that raises, or whose update fails validation, is dropped from the round
        and recorded (``federation.on_client_error = "skip"``) or stops the run
        (``"fail"``). A round with fewer than ``federation.min_clients`` good clients is
        rerun on a fresh sample up to ``federation.round_retries`` times, then stops the
        run; its last checkpoint stays intact for ``--resume``.
        """
        fed = self.fed
        cfg = self.config
        start = time.perf_counter()
        self.memory.start()
        every = cfg.eval.every
        evaluate = every > 0 and ((rnd + 1) % every == 0 or rnd + 1 == cfg.run.rounds)
        failures: list[dict[str, Any]] = []
        for attempt in range(cfg.federation.round_retries + 1):
            clients = sample_clients(cfg, fed.client_ids, rnd, attempt)
            outcomes, references = self._run_clients(rnd, clients, evaluate, attempt, failures)
            if len(outcomes) >= cfg.federation.min_clients:
                break
        else:
            raise FedLoraError(self._too_few_clients(rnd, failures))
        round_lambdas: list[float] = []
        for cid, outcome in outcomes.items():
            self.store.put(cid, outcome.private, rnd)
            self.trainable_params = max(self.trainable_params, outcome.trainable_params)
            lambdas = {k: v for k, v in outcome.update.metrics.items() if k.startswith(LAMBDA_REPORT)}
            if lambdas:
                self.reported[cid] = lambdas
                round_lambdas.extend(float(v) for v in lambdas.values())
        uploads = {cid: {**o.update.tensors, **o.head_upload} for cid, o in outcomes.items()}
        scales: dict[int, float] = {}
        if cfg.federation.clip_update_norm > 0:
            uploads, scales = clip_to_median(uploads, references, cfg.federation.clip_update_norm)
        privacy_row: dict[str, Any] = {}
        if fed.privacy.enabled:
            hooks = {cid: o.update.hook_tensors for cid, o in outcomes.items()}
            uploads, record = fed.privacy.process(rnd, uploads, references, hooks)
            privacy_row = record.row()
        updates = {
            cid: Update(
                {k: v for k, v in uploads[cid].items() if not is_head_key(k)},
                o.update.num_examples,
                o.update.metrics,
                o.update.hook_tensors,
            )
            for cid, o in outcomes.items()
        }
        head_uploads = {cid: {k: v for k, v in uploads[cid].items() if is_head_key(k)} for cid in outcomes}
        # The server learns each client's example count from its update, not from a shared partition.
        fed.ctx.num_examples.update({cid: u.num_examples for cid, u in updates.items()})
        fed.algorithm.aggregate(rnd, updates)
        fed.head.aggregate(head_uploads, fed.algorithm.weights(list(head_uploads)))
        global_result = self._evaluate_global() if evaluate else None
        seconds = time.perf_counter() - start
        client_rows = [o.row for o in outcomes.values()]
        results = {cid: o.result for cid, o in outcomes.items() if o.result is not None}
        received = {cid: o.received for cid, o in outcomes.items() if o.received is not None}
        memory = self.memory.read()
        aggregate = round_aggregate(
            rnd,
            client_rows,
            results if evaluate else None,
            global_result,
            seconds,
            failures,
            scales,
            received,
            memory,
            round_lambdas,
        )
        aggregate.update(privacy_row)
        self.log.write_rows([*client_rows, aggregate])
        self.elapsed += seconds
        self.next_round = rnd + 1
        self._checkpoint()
        if self.on_progress:
            self.on_progress(rnd, None)
        return aggregate

    def run_clients(
        self, rnd: int, payloads: Mapping[int, Payload], head_payload: Tensors, evaluate: bool
    ) -> dict[int, ClientOutcome | ClientFailure]:
        """Every sampled client's round, here in this process, one after the other.

        This is what a runtime changes (the Flower server sends the payloads to its nodes
        instead); a client's exception becomes its :class:`ClientFailure`. Validation,
        retries and aggregation stay with the caller.
        """
        results: dict[int, ClientOutcome | ClientFailure] = {}
        for cid, payload in payloads.items():
            try:
                context = self.fed.client_context(cid)
                results[cid] = client_round(context, rnd, payload, self.store.get(cid), head_payload, evaluate)
            except Exception as exc:  # any fault of one client drops that client only
                results[cid] = ClientFailure(type(exc).__name__, str(exc), exc)
                if self.config.federation.on_client_error == "fail":
                    break  # the run stops at this client; the rest need not train
            if self.on_progress:
                self.on_progress(rnd, cid)
        return results

    def _run_clients(
        self, rnd: int, clients: Sequence[int], evaluate: bool, attempt: int, failures: list[dict[str, Any]]
    ) -> tuple[dict[int, ClientOutcome], dict[int, Tensors]]:
        """Every sampled client's round; failed or rejected clients go to ``failures``.

        Returns the good outcomes and, when updates are clipped, what each client started
        the round from (the reference of its update's change).
        """
        fed = self.fed
        payloads = fed.algorithm.payloads(rnd, clients)
        head_payload = fed.head.payload()
        head_shapes = {k: tuple(v.shape) for k, v in head_payload.items()}
        results = self.run_clients(rnd, payloads, head_payload, evaluate)
        outcomes: dict[int, ClientOutcome] = {}
        references: dict[int, Tensors] = {}
        for cid in clients:  # the sampled order, whatever order the results came in
            payload = payloads[cid]
            result = results.get(cid, ClientFailure("NoResult", "the runtime returned nothing for this client"))
            if isinstance(result, ClientFailure):
                if self.config.federation.on_client_error == "fail":
                    raise FedLoraError(
                        f"client {cid} failed in round {rnd}: {result.error}: {result.message}; set "
                        "federation.on_client_error = 'skip' to drop a failing client's update and continue"
                    ) from result.exception
                failures.append({"round": rnd, "client": cid, "attempt": attempt, **result.record()})
                continue
            problem = update_problem(
                {**result.update.tensors, **result.head_upload, **hook_keys(result.update.hook_tensors)},
                {
                    **expected_upload(payload, fed.ctx.module_shapes, head_shapes),
                    **{k: tuple(v.shape) for k, v in hook_keys(payload.hook_tensors).items()},
                },
            )
            bad_private = non_finite_keys(result.private)
            if problem is None and bad_private:
                problem = f"non-finite values (NaN or Inf) in the private state {bad_private[:3]}"
            if problem is not None:
                if self.config.federation.on_client_error == "fail":
                    raise FedLoraError(
                        f"client {cid}'s update in round {rnd} was rejected: {problem}; set "
                        "federation.on_client_error = 'skip' to drop rejected updates and continue"
                    )
                failures.append(
                    {
                        "round": rnd,
                        "client": cid,
                        "attempt": attempt,
                        **ClientFailure("RejectedUpdate", problem).record(),
                    }
                )
                continue
            result.row["bytes_up"] = bytes_up(result.update, result.head_upload)
            result.row["bytes_down"] = bytes_down(payload, head_payload)
            outcomes[cid] = result
            if self.config.federation.clip_update_norm > 0 or self.fed.privacy.central:
                references[cid] = self._reference(result, payload, self.store.get(cid), head_payload)
        return outcomes, references

    def _reference(self, outcome: ClientOutcome, payload: Payload, private: Tensors, head: Tensors) -> Tensors:
        """What a client's uploaded tensors started the round as (same order as ``ClientRunner.load``)."""
        uploaded = {**outcome.update.tensors, **outcome.head_upload}
        start = {**private, **payload.tensors, **head}
        if any(k not in start for k in uploaded):
            start = {**init_state(payload.layout, self.fed.ctx.module_shapes, self.config.run.seed), **start}
        return {k: start[k] for k in uploaded}

    def _too_few_clients(self, rnd: int, failures: Sequence[Mapping[str, Any]]) -> str:
        fed_cfg = self.config.federation
        listed = "; ".join(f"client {f['client']}: {f['error']}: {f['message']}" for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        return (
            f"round {rnd}: fewer than federation.min_clients = {fed_cfg.min_clients} clients succeeded "
            f"in {fed_cfg.round_retries + 1} attempt(s); failures: {listed}{more}. The last checkpoint is intact: "
            f"fix the cause and continue with --resume {self.out_dir}, or lower federation.min_clients or raise "
            "federation.round_retries"
        )

    def _evaluate_global(self) -> EvalResult | None:
        fed = self.fed
        payload = fed.algorithm.global_payload()
        if payload is None:
            return None
        fed.runner.load(payload, {}, fed.head.payload())
        return fed.runner.evaluate(fed.test_union)

    # --- checkpoints ------------------------------------------------------------------
    def _checkpoint(self) -> None:
        tensors, meta = self.fed.algorithm.state_dict()
        state = {
            "next_round": self.next_round,
            "elapsed": self.elapsed,
            "trainable_params": self.trainable_params,
            "algorithm_meta": meta,
            "reported": {str(c): r for c, r in self.reported.items()},
            "privacy": self.fed.privacy.state_dict(),
        }
        files = {
            "algorithm.safetensors": save_tensors({k: v.contiguous() for k, v in tensors.items()}),
            "head.safetensors": save_tensors({k: v.contiguous() for k, v in self.fed.head.state.items()}),
            "clients.json": self.store.index_bytes(),
            "state.json": json.dumps(state).encode(),
        }
        write_checkpoint(self.out_dir / CHECKPOINTS, self.next_round, files, KEEP_CHECKPOINTS)
        self.store.collect(self._kept_client_indices())

    def _kept_client_indices(self) -> list[bytes]:
        return [
            (p / "clients.json").read_bytes()
            for p in list_checkpoints(self.out_dir / CHECKPOINTS)
            if (p / "clients.json").is_file()
        ]

    def restore(self, *, last_good: bool = False) -> None:
        """Load the state of the latest checkpoint (read only; see :meth:`resume`).

        With ``last_good``, a damaged latest checkpoint is skipped for the newest intact
        one. A run directory without any checkpoint restores to round 0.
        """
        root = self.out_dir / CHECKPOINTS
        path = select_checkpoint(root, last_good=last_good)
        if path is None:
            return
        files = read_checkpoint(path)
        state = json.loads(files["state.json"])
        self.fed.algorithm.load_state_dict(dict(load_tensors(files["algorithm.safetensors"])), state["algorithm_meta"])
        self.store.load_index(files["clients.json"])
        self.fed.head.load(load_tensors(files["head.safetensors"]))
        self.next_round = int(state["next_round"])
        self.elapsed = float(state["elapsed"])
        self.trainable_params = int(state["trainable_params"])
        self.reported = {int(c): dict(r) for c, r in state.get("reported", {}).items()}
        if "privacy" in state:
            self.fed.privacy.load_state_dict(state["privacy"])
        self.restored_from = path

    def resume(self, *, last_good: bool = False) -> None:
        """Continue from the latest checkpoint in ``out_dir`` (``last_good``: the newest intact one).

        Drops what a killed run wrote after that checkpoint: metrics rows of later rounds
        (a half-written last line included), damaged newer checkpoints and client-state
        files no checkpoint refers to.
        """
        self.restore(last_good=last_good)
        if self.restored_from is not None:
            for newer in list_checkpoints(self.out_dir / CHECKPOINTS):
                if newer.name > self.restored_from.name:
                    shutil.rmtree(newer)
        self.log.truncate(self.next_round)
        self.store.collect(self._kept_client_indices())

    # --- whole run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining rounds and write ``summary.json``; return the summary."""
        for rnd in range(self.next_round, self.config.run.rounds):
            self.run_round(rnd)
        summary = summarize(self.config, self.fed, self.log.rows(), self.elapsed, self.trainable_params, self.reported)
        if self.fed.privacy.enabled:
            summary["privacy"] = self.fed.privacy.summary(self.config.algorithm_name)
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return summary


def summarize(
    config: Config,
    fed: Federation,
    rows: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    trainable_params: int,
    reported: Mapping[int, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """``summary.json``: the run's identity, final and best rows, totals and structure.

    ``personalized`` names the evaluation protocol(s) of the run; ``best`` is the round with
    the best personalized score after local training ("trained") and ``best_received`` the
    best before it ("received"); either is None when its protocol was not run. ``final``
    holds both protocols' keys (``personalized_*`` and ``personalized_*_received``);
    ``last`` the mean of each protocol's last 4 evaluations (:func:`last_evaluations`).

    ``reported`` holds each client's latest reported metrics; the mixing weights among them
    (``lambda/<module>``, see :class:`~fedlora.algorithms.base.ReportLambdas`) go into
    ``structure["lambdas"]`` per client and module: the server never sees theta itself.
    """
    agg = aggregate_rows(rows)
    total_params = fed.lora_model.base_param_count() + trainable_params
    structure = fed.algorithm.structure()
    lambdas = client_lambdas(reported or {})
    if lambdas:
        structure = {**structure, "lambdas": lambdas}
    return {
        "algorithm": config.algorithm_name,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "num_clients": len(fed.client_ids),
        "rounds": config.run.rounds,
        "seed": config.run.seed,
        "metric": fed.runner.objective.metric,
        "final": agg[-1] if agg else None,
        "personalized": config.eval.personalized,
        "best": best_round(agg),
        "best_received": best_round(agg, RECEIVED),
        "last": last_evaluations(agg),
        "wall_seconds": wall_seconds,
        "bytes_up_total": int(sum(r["bytes_up"] for r in agg)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in agg)),
        "trainable_params": trainable_params,
        "trainable_percent": 100.0 * trainable_params / total_params if total_params else None,
        "ranks": {str(c): r for c, r in fed.ctx.ranks.items()},
        "structure": structure,
        "failures": [f for r in agg for f in r.get("failures", [])],
        "device": str(fed.runner.objective.device),
        "precision": config.train.precision,
        "quantization": config.model.quantization,
        "peak_rss_bytes": _peak(agg, "peak_rss_bytes"),
        "peak_accel_bytes": _peak(agg, "peak_accel_bytes"),
    }


def _peak(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The largest ``key`` over the rows that have it (None when none has)."""
    values = [int(r[key]) for r in rows if r.get(key) is not None]
    return max(values) if values else None
