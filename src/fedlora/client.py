"""Local training and evaluation of one client on the one shared model.

The runtime keeps a single :class:`~fedlora.lora.LoraModel` in memory. For each client
it calls :meth:`ClientRunner.load` (layout, seeded defaults, private state, payload),
:meth:`ClientRunner.train` (AdamW over the layout's trainable tensors), then reads the
trained tensors back with :meth:`ClientRunner.trained_state`. The loop is plain PyTorch;
the loss and the evaluation come from the task's :class:`~fedlora.tasks.Objective`.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedlora.accel import autocast, grad_scaler
from fedlora.algorithms.base import Payload, Tensors
from fedlora.config import TrainConfig
from fedlora.lora import LoraModel, init_state
from fedlora.tasks import EvalResult, Objective

__all__ = ["ClientRunner", "EvalResult", "derive_seed"]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, round, client, purpose)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


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
    def batches(self, indices: np.ndarray, seed: int) -> list[np.ndarray]:
        """The round's mini-batches: seeded shuffles, ``local_steps`` batches or whole epochs."""
        cfg = self.train_config
        rng = np.random.default_rng(seed)
        bs = min(cfg.batch_size, len(indices))
        per_epoch = math.ceil(len(indices) / bs)
        steps = cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * per_epoch
        out: list[np.ndarray] = []
        while len(out) < steps:
            order = rng.permutation(indices)
            out.extend(order[i : i + bs] for i in range(0, len(order), bs))
        return out[:steps]

    def train(self, client: int, rnd: int, indices: np.ndarray, lr_multipliers: Mapping[str, float]) -> float:
        """Run the round's local steps; return the mean training loss."""
        cfg = self.train_config
        keys = self.trainable_keys()
        trainable = set(keys)
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
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
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
        self, indices: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray | None = None
    ) -> EvalResult:
        """The task's scores and loss sums on ``indices`` with the model as loaded.

        ``reference`` (the client's training examples) is needed when the payload weights
        slots per instance: each test input (what the model sees at test time: the text,
        or the prompt for generation) is compared with their mean pooled feature.
        """
        idx = np.asarray(indices)
        if len(idx) == 0:
            return EvalResult(0, 0.0, 0)
        bs = self.train_config.eval_batch_size
        weighting = self._payload.instance_weighting if self._payload is not None else None
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
