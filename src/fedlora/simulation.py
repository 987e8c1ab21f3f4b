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
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlora.algorithms import Algorithm, FederationContext, Payload, Update, get_algorithm, parse_options
from fedlora.algorithms.base import Tensors
from fedlora.client import ClientRunner, EvalResult, derive_seed
from fedlora.config import Config
from fedlora.data import ClientSplit, TextDataset, TokenizedCorpus, load_dataset, partition, split_clients
from fedlora.errors import FedLoraError
from fedlora.generation import InstructCorpus
from fedlora.heads import HeadPolicy, is_head_key
from fedlora.lora import LoraModel, num_bytes
from fedlora.metrics import MetricsLog, round_aggregate, summarize
from fedlora.models import LoadedModel, load_model
from fedlora.tasks import build_objective, task_for

CHECKPOINTS = "checkpoints"
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


def sample_clients(config: Config, client_ids: Sequence[int], rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded sample of ``fraction`` of them, at least ``min_clients``."""
    if config.federation.min_clients > len(client_ids):
        raise FedLoraError(
            f"federation.min_clients = {config.federation.min_clients} but the federation has {len(client_ids)} clients"
        )
    m = max(config.federation.min_clients, round(config.federation.fraction * len(client_ids)))
    if m >= len(client_ids):
        return list(client_ids)
    rng = np.random.default_rng(derive_seed(config.run.seed, rnd, "sample"))
    return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=m, replace=False))


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
    corpus: TokenizedCorpus | InstructCorpus
    ctx: FederationContext
    algorithm: Algorithm
    head: HeadPolicy
    runner: ClientRunner
    test_union: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.test_union = np.concatenate([s.test for s in self.splits]) if self.splits else np.array([], dtype=np.int64)

    @property
    def client_ids(self) -> list[int]:
        return self.ctx.client_ids


def build_federation(config: Config) -> Federation:
    """Load data and model, partition, tokenize once, and build the algorithm."""
    algorithm_cls = get_algorithm(config.algorithm_name)
    options = parse_options(algorithm_cls, config.algorithm_options)
    dataset = load_dataset(config.data.dataset)
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
    empty = [i for i, s in enumerate(splits) if len(s.train) == 0]
    if empty:
        raise FedLoraError(
            f"clients {empty[:5]} have no training examples; use fewer clients or a larger min_partition_size"
        )
    task = task_for(dataset)
    if task == "causal_lm" and config.model.head != "frozen":
        raise FedLoraError(
            f"model.head = {config.model.head!r} applies to classification; {dataset.name} trains a causal LM "
            "(no classification head): leave model.head = 'frozen'"
        )
    num_labels = len(dataset.label_names) if task == "classification" else None
    loaded = load_model(config.model.name, task=task, num_labels=num_labels, head_seed=config.run.seed)
    targets = config.model.target_modules or list(loaded.default_targets)
    lora_model = LoraModel(loaded.model, targets, loaded.head_module)
    # Tokenize once, and only the examples some client uses (caps can leave most out).
    used = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits]))
    splits = [ClientSplit(np.searchsorted(used, s.train), np.searchsorted(used, s.test)) for s in splits]
    objective = build_objective(dataset, used, loaded.tokenizer, config)
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
    )
    algorithm = algorithm_cls(ctx, options)
    head_init = lora_model.head_state()
    head = HeadPolicy(config.model.head, head_init)
    runner = ClientRunner(lora_model, objective, config.train, config.run.seed, head_init, head.trainable)
    return Federation(config, dataset, used, splits, loaded, lora_model, objective.corpus, ctx, algorithm, head, runner)


@dataclass
class ClientOutcome:
    """What one client's round produced: its update, new private state and metrics row."""

    update: Update
    head_upload: Tensors
    private: Tensors
    row: dict[str, Any]
    result: EvalResult | None
    trainable_params: int


def client_round(
    fed: Federation,
    rnd: int,
    cid: int,
    payload: Payload,
    private: Tensors,
    head_payload: Tensors,
    evaluate: bool,
) -> ClientOutcome:
    """One client's round on the shared model (used by every runtime).

    Loads the payload over the client's private state, trains, splits what it trained
    into upload and private state (adapters by the payload's upload patterns, the head by
    the head policy), and evaluates on the client's test split if asked.
    """
    fed.runner.load(payload, private, head_payload)
    train_idx = fed.splits[cid].train
    train_loss = fed.runner.train(cid, rnd, train_idx, fed.algorithm.lr_multipliers)
    trained = fed.runner.trained_state()
    adapters = {k: v for k, v in trained.items() if not is_head_key(k)}
    head = {k: v for k, v in trained.items() if is_head_key(k)}
    upload, new_private = payload.split(adapters)
    head_upload = head if fed.head.policy == "federated" and payload.upload else {}
    new_private.update({k: v for k, v in head.items() if k not in head_upload})
    row: dict[str, Any] = {
        "round": rnd,
        "client": cid,
        "split": "test",
        "train_loss": train_loss,
        "bytes_up": num_bytes(upload) + num_bytes(head_upload),
        "bytes_down": payload.download_bytes() + (num_bytes(head_payload) if payload.upload else 0),
        "n_train": len(train_idx),
    }
    result = None
    if evaluate:
        result = fed.runner.evaluate(fed.splits[cid].test)
        row.update(acc=result.acc, loss=result.loss, n=result.n, **result.extra_row())
    return ClientOutcome(
        update=Update(upload, len(train_idx), {"train_loss": train_loss}),
        head_upload=head_upload,
        private=new_private,
        row=row,
        result=result,
        trainable_params=sum(t.numel() for t in trained.values()),
    )


class ClientStore:
    """Private client state kept across rounds (FedSA's B, FedTreeLoRA's lambda...)."""

    def __init__(self) -> None:
        self._state: dict[int, Tensors] = {}

    def get(self, client: int) -> Tensors:
        return self._state.get(client, {})

    def put(self, client: int, tensors: Tensors) -> None:
        self._state[client] = tensors

    def flat(self) -> Tensors:
        return {f"{c}/{k}": v for c, t in self._state.items() for k, v in t.items()}

    def load_flat(self, flat: Mapping[str, torch.Tensor]) -> None:
        self._state = {}
        for key, value in flat.items():
            client, name = key.split("/", 1)
            self._state.setdefault(int(client), {})[name] = value


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

    def __init__(self, config: Config, out_dir: Path, on_progress: ProgressHook | None = None) -> None:
        self.config = config
        self.out_dir = out_dir
        self.on_progress = on_progress
        self.fed = build_federation(config)
        self.store = ClientStore()
        self.log = MetricsLog(out_dir / "metrics.jsonl")
        self.next_round = 0
        self.elapsed = 0.0
        self.trainable_params = 0

    # --- one round --------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict[str, Any]:
        fed = self.fed
        cfg = self.config
        start = time.perf_counter()
        clients = sample_clients(cfg, fed.client_ids, rnd)
        payloads = fed.algorithm.configure(rnd, clients)
        every = cfg.eval.every
        evaluate = every > 0 and ((rnd + 1) % every == 0 or rnd + 1 == cfg.run.rounds)
        head_payload = fed.head.payload()
        updates: dict[int, Update] = {}
        head_uploads: dict[int, Tensors] = {}
        client_rows: list[dict[str, Any]] = []
        results: dict[int, EvalResult] = {}
        for cid in clients:
            outcome = client_round(fed, rnd, cid, payloads[cid], self.store.get(cid), head_payload, evaluate)
            self.trainable_params = max(self.trainable_params, outcome.trainable_params)
            self.store.put(cid, outcome.private)
            updates[cid] = outcome.update
            head_uploads[cid] = outcome.head_upload
            client_rows.append(outcome.row)
            if outcome.result is not None:
                results[cid] = outcome.result
            if self.on_progress:
                self.on_progress(rnd, cid)
        fed.algorithm.aggregate(rnd, updates)
        fed.head.aggregate(head_uploads, fed.algorithm.weights(list(head_uploads)))
        global_result = self._evaluate_global() if evaluate else None
        seconds = time.perf_counter() - start
        aggregate = round_aggregate(rnd, client_rows, results if evaluate else None, global_result, seconds)
        for row in client_rows:
            self.log.write(row)
        self.log.write(aggregate)
        self.elapsed += seconds
        self.next_round = rnd + 1
        self._checkpoint()
        if self.on_progress:
            self.on_progress(rnd, None)
        return aggregate

    def _evaluate_global(self) -> EvalResult | None:
        fed = self.fed
        payload = fed.algorithm.global_payload()
        if payload is None:
            return None
        fed.runner.load(payload, {}, fed.head.payload())
        return fed.runner.evaluate(fed.test_union)

    # --- checkpoints ------------------------------------------------------------------
    def _checkpoint(self) -> None:
        root = self.out_dir / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"round_{self.next_round:05d}"
        tmp = root / f".tmp_round_{self.next_round:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, meta = self.fed.algorithm.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "algorithm.safetensors"))
        save_file({k: v.contiguous() for k, v in self.store.flat().items()}, str(tmp / "clients.safetensors"))
        save_file({k: v.contiguous() for k, v in self.fed.head.state.items()}, str(tmp / "head.safetensors"))
        state = {
            "next_round": self.next_round,
            "elapsed": self.elapsed,
            "trainable_params": self.trainable_params,
            "algorithm_meta": meta,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("round_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        """Continue from the latest checkpoint in ``out_dir``."""
        checkpoints = sorted((self.out_dir / CHECKPOINTS).glob("round_*"))
        if not checkpoints:
            raise FedLoraError(f"{self.out_dir} has no checkpoint to resume from; start the run without --resume")
        latest = checkpoints[-1]
        state = json.loads((latest / "state.json").read_text())
        self.fed.algorithm.load_state_dict(load_file(str(latest / "algorithm.safetensors")), state["algorithm_meta"])
        self.store.load_flat(load_file(str(latest / "clients.safetensors")))
        self.fed.head.load(load_file(str(latest / "head.safetensors")))
        self.next_round = int(state["next_round"])
        self.elapsed = float(state["elapsed"])
        self.trainable_params = int(state["trainable_params"])
        self.log.truncate(lambda row: int(row["round"]) < self.next_round)

    # --- whole run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining rounds and write ``summary.json``; return the summary."""
        for rnd in range(self.next_round, self.config.run.rounds):
            self.run_round(rnd)
        summary = summarize(self.config, self.fed, self.log.rows(), self.elapsed, self.trainable_params)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
