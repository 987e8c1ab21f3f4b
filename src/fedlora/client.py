"""Local training and evaluation of one client on the one shared model.

:func:`client_round` is a client's whole round, in every runtime: it takes the client's
:class:`ClientContext` (its runner and its own data), the round's payload and its private
state, and returns a :class:`ClientOutcome`. It never sees the federation.

The runtime keeps a single :class:`~fedlora.lora.LoraModel` in memory. For each client
it calls :meth:`ClientRunner.load` (layout, seeded defaults, private state, payload),
:meth:`ClientRunner.train` (AdamW over the layout's trainable tensors), then reads the
trained tensors back with :meth:`ClientRunner.trained_state`. The loop is plain PyTorch;
the loss and the evaluation come from the task's :class:`~fedlora.tasks.Objective`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.accel import autocast, grad_scaler
from fedlora.algorithms.base import ClientHooks, Payload, Tensors, Update
from fedlora.config import TrainConfig
from fedlora.heads import is_head_key
from fedlora.lora import LoraModel, init_state
from fedlora.metrics import RECEIVED
from fedlora.seeds import derive_seed
from fedlora.tasks import EvalResult, Objective

if TYPE_CHECKING:
    from fedlora.privacy import LocalNoise

#: Prefix of the hooks' private state among a client's private tensors (never loaded into the model).
HOOK_STATE = "hook/"

__all__ = ["ClientContext", "ClientOutcome", "ClientRunner", "EvalResult", "client_round"]


class ClientRunner:
    """Trains and evaluates any client on the shared model.

    Parameters
    ----------
    lora_model
        The one model, with LoRA injected.
    objective
        The task's loss and evaluation over the run's examples (tokenized once).
    train
        Local training settings.
    seed
        The run seed: LoRA init, batch order and dropout derive from it.
    head_init
        The seeded head tensors (defaults for a trained head).
    head_trainable
        Whether clients train the classification head (policy ``local``/``federated``).
    """

    def __init__(
        self,
        lora_model: LoraModel,
        objective: Objective,
        train: TrainConfig,
        seed: int,
        head_init: Tensors,
        head_trainable: bool,
    ) -> None:
        self.lora_model = lora_model
        self.objective = objective
        self.train_config = train
        self.seed = seed
        self.head_init = head_init
        self.head_trainable = head_trainable
        self._payload: Payload | None = None

    # --- state ------------------------------------------------------------------------
    def load(self, payload: Payload, private: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]) -> None:
        """Make the model hold this client's model for the round.

        Order: seeded defaults for the layout, then private state, then the payload (and
        ``extra``, the head tensors from the head policy). Later sources win.
        """
        lm = self.lora_model
        lm.apply_layout(payload.layout)
        state = init_state(payload.layout, lm.shapes, self.seed)
        state.update(self.head_init)
        state.update(private)
        state.update(payload.tensors)
        state.update(extra)
        lm.load(state)
        self._payload = payload

    def trainable_keys(self) -> list[str]:
        if self._payload is None:
            raise RuntimeError("load() a payload first")
        keys = self._payload.layout.trainable_keys()
        if self.head_trainable:
            keys += list(self.head_init)
        return keys

    def trained_state(self) -> Tensors:
        """Copies of every tensor trained this round (adapters, mixing, head)."""
        return self.lora_model.read(self.trainable_keys())

    # --- training ---------------------------------------------------------------------
    def num_steps(self, num_examples: int) -> int:
        """Local steps of a round over ``num_examples``: ``local_steps``, or whole epochs of batches."""
        cfg = self.train_config
        per_epoch = math.ceil(num_examples / min(cfg.batch_size, num_examples))
        return cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * per_epoch

    def batches(self, indices: np.ndarray, seed: int) -> list[np.ndarray]:
        """The round's mini-batches: seeded shuffles, ``local_steps`` batches or whole epochs."""
        rng = np.random.default_rng(seed)
        bs = min(self.train_config.batch_size, len(indices))
        steps = self.num_steps(len(indices))
        out: list[np.ndarray] = []
        while len(out) < steps:
            order = rng.permutation(indices)
            out.extend(order[i : i + bs] for i in range(0, len(order), bs))
        return out[:steps]

    def train(
        self,
        client: int,
        rnd: int,
        indices: np.ndarray,
        lr_multipliers: Mapping[str, float],
        hooks: ClientHooks | None = None,
    ) -> float:
        """Run the round's local steps; return the mean training loss (the task's, without
        the hooks' extra term, which is added to what is minimised)."""
        cfg = self.train_config
        keys = self.trainable_keys()
        trainable = set(keys)
        live = dict(self.lora_model.parameters_for(keys))
        start = {k: v.detach().clone() for k, v in live.items()}
        for key, param in self.lora_model.parameters_for(self.lora_model.all_keys()):
            param.requires_grad_(key in trainable)
        groups: dict[float, list[torch.Tensor]] = {}
        for key, param in self.lora_model.parameters_for(keys):
            mult = next((m for pat, m in lr_multipliers.items() if fnmatch.fnmatchcase(key, pat)), 1.0)
            groups.setdefault(mult, []).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": cfg.lr * m} for m, ps in groups.items()], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        seed = derive_seed(self.seed, rnd, client, "train")
        torch.manual_seed(seed)
        model = self.lora_model.model
        model.train()
        device = self.objective.device
        scaler = grad_scaler(device, cfg.precision)  # fp16 only; passes through otherwise
        losses: list[float] = []
        for batch_idx in self.batches(indices, seed):
            with autocast(device, cfg.precision):
                loss = self.objective.train_loss(model, batch_idx)
            extra = hooks.extra_loss(live, start) if hooks is not None else None
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss if extra is None else loss + extra).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        model.eval()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.inference_mode()
    def pooled_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each input's token embeddings (frozen embedding layer) averaged over its attention mask."""
        # Every transformers model has get_input_embeddings(); nn.Module's typing does not know it.
        embedding_layer = getattr(self.lora_model.model, "get_input_embeddings")()  # noqa: B009
        embeddings: torch.Tensor = embedding_layer(batch["input_ids"])
        mask = batch["attention_mask"].unsqueeze(-1).to(embeddings.dtype)
        pooled: torch.Tensor = (embeddings * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled

    @torch.inference_mode()
    def evaluate(
        self,
        indices: Sequence[int] | np.ndarray,
        reference: Sequence[int] | np.ndarray | None = None,
        hooks: ClientHooks | None = None,
    ) -> EvalResult:
        """The task's scores and loss sums on ``indices`` with the model as loaded.

        ``reference`` (the client's training examples) is needed when the hooks weight
        slots per instance: each test input (what the model sees at test time: the text,
        or the prompt for generation) is compared with their mean pooled feature.
        """
        idx = np.asarray(indices)
        if len(idx) == 0:
            return EvalResult(0, 0.0, 0)
        bs = self.train_config.eval_batch_size
        weighting = hooks if hooks is not None and hooks.weights_instances else None
        before_batch = None
        weight_sums: dict[str, float] = {}
        if weighting is not None:
            if reference is None or len(reference) == 0:
                raise RuntimeError("instance-weighted evaluation needs the client's training examples as reference")
            ref = np.asarray(reference)
            inputs = self.objective.inputs
            mean_feature = torch.cat(
                [self.pooled_features(inputs(ref[i : i + bs])) for i in range(0, len(ref), bs)]
            ).mean(0)

            def before_batch(chunk: np.ndarray) -> None:
                weights = weighting.slot_weights(self.pooled_features(inputs(chunk)), mean_feature)
                self.lora_model.set_instance_weights(weights)
                for slot, w in weights.items():
                    weight_sums[slot] = weight_sums.get(slot, 0.0) + float(w.sum())

        self.lora_model.model.eval()
        try:
            with autocast(self.objective.device, self.train_config.precision):
                result = self.objective.evaluate(self.lora_model.model, idx, bs, before_batch)
        finally:
            self.lora_model.set_instance_weights(None)
        result.slot_weight_sums = weight_sums
        return result


@dataclass
class ClientContext:
    """What one client needs for a round, built from the config and the client's own data.

    Nothing here reaches the federation: a runtime (the simulator, a Flower SuperNode)
    builds one per client and passes it to :func:`client_round` with the round's payload.

    Attributes
    ----------
    client
        The client's id (seeds of its batches and dropout derive from it).
    runner
        The model runner: the model with LoRA, the task's objective over the client's
        examples, the training settings and the run seed.
    train, test
        The client's training and test examples (rows of ``runner.objective``).
    head_policy
        ``model.head``: whether a trained head is uploaded (``federated``) or kept.
    personalized
        ``eval.personalized``: which evaluation protocol(s) to score.
    hooks
        The algorithm's client hooks class (``Algorithm.client_hooks``, found by the
        config's algorithm name); built each round from the payload's instruction.
    local_dp
        ``privacy.mode = "local"``: the client's own clipping and noise of its upload
        (:class:`~fedlora.privacy.LocalNoise`); ``None`` otherwise.
    """

    client: int
    runner: ClientRunner
    train: np.ndarray
    test: np.ndarray
    head_policy: str = "frozen"
    personalized: str = "both"
    hooks: type[ClientHooks] = ClientHooks
    local_dp: LocalNoise | None = None


@dataclass
class ClientOutcome:
    """What one client's round produced: its update, new private state and metrics row."""

    update: Update
    head_upload: Tensors
    private: Tensors
    row: dict[str, Any]
    result: EvalResult | None
    trainable_params: int
    #: The evaluation of the received model, before training (``eval.personalized``).
    received: EvalResult | None = None


def eval_fields(result: EvalResult, suffix: str = "") -> dict[str, Any]:
    """A client's evaluation as metrics-row fields: ``acc``, ``loss``, ``n``, the task's extra
    means and the slot weights, each key followed by ``suffix`` (``n`` excepted)."""
    fields = {"acc": result.acc, "loss": result.loss, **result.extra_row(), **result.slot_weight_means()}
    return {"n": result.n, **{f"{key}{suffix}": value for key, value in fields.items()}}


def client_round(
    ctx: ClientContext, rnd: int, payload: Payload, private: Tensors, head_payload: Tensors, evaluate: bool
) -> ClientOutcome:
    """One client's round on the shared model (used by every runtime).

    Loads the payload over the client's private state, scores that received model on the
    client's test split (``eval.personalized`` "received" or "both"), trains with the
    payload's learning-rate multipliers, splits what it trained into upload and private
    state (adapters by the payload's upload patterns, the head by the head policy), and
    scores the trained model ("trained" or "both"). Nothing is scored in a round that is
    not evaluated. The hooks' uploads and private state (``hook/<key>`` among the private
    tensors) travel beside the model's. The update carries the client's own example count. The row's byte
    counts are the server's to add (:mod:`fedlora.traffic`).
    """
    runner = ctx.runner
    model_private = {k: v for k, v in private.items() if not k.startswith(HOOK_STATE)}
    hook_state = {k.removeprefix(HOOK_STATE): v for k, v in private.items() if k.startswith(HOOK_STATE)}
    hooks = ctx.hooks(payload.instruction, payload.hook_tensors, hook_state)
    runner.load(payload, model_private, head_payload)
    received = None
    if evaluate and ctx.personalized in ("received", "both"):
        received = runner.evaluate(ctx.test, ctx.train, hooks)
    start = runner.trained_state()
    train_loss = runner.train(ctx.client, rnd, ctx.train, payload.lr_multipliers, hooks)
    trained = runner.trained_state()
    hook_upload, hook_state = hooks.finish(trained, start, runner.num_steps(len(ctx.train)), runner.train_config.lr)
    adapters = {k: v for k, v in trained.items() if not is_head_key(k)}
    head = {k: v for k, v in trained.items() if is_head_key(k)}
    upload, new_private = payload.split(adapters)
    head_upload = head if ctx.head_policy == "federated" and payload.upload else {}
    new_private.update({k: v for k, v in head.items() if k not in head_upload})
    new_private.update({f"{HOOK_STATE}{k}": v for k, v in hook_state.items()})
    if ctx.local_dp is not None:
        upload, head_upload = ctx.local_dp.apply(rnd, ctx.client, upload, head_upload, start)
    row: dict[str, Any] = {
        "round": rnd,
        "client": ctx.client,
        "split": "test",
        "train_loss": train_loss,
        "n_train": len(ctx.train),
    }
    result = None
    if evaluate and ctx.personalized in ("trained", "both"):
        result = runner.evaluate(ctx.test, ctx.train, hooks)
        row.update(eval_fields(result))
    if received is not None:
        row.update(eval_fields(received, RECEIVED))
    metrics: dict[str, float] = {"train_loss": train_loss, **hooks.report(trained)}
    # The test-time slot weights depend on the frozen embeddings only: both protocols see the same.
    scored = result if result is not None else received
    if scored is not None:
        metrics.update(scored.slot_weight_means())
    return ClientOutcome(
        update=Update(upload, len(ctx.train), metrics, hook_upload),
        head_upload=head_upload,
        private=new_private,
        row=row,
        result=result,
        trainable_params=sum(t.numel() for t in trained.values()),
        received=received,
    )
