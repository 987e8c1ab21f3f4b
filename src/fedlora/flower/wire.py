"""What travels between the ServerApp and the ClientApps, as Flower records.

A train message holds three records:

``fedlora``
    A ConfigRecord: the run config (TOML text; the client builds its own context from
    it and its node's data), the federation's class names, the round, the fedlora client
    id, whether to evaluate, and the payload's layout (``Layout.to_json``), upload
    patterns, ``wire_bytes``, learning-rate multipliers and the client instruction
    (whatever it holds: plain JSON values; the client's hooks class comes from its own
    registry by the config's algorithm name, never from the message) as JSON strings.
``payload``
    An ArrayRecord: the payload's tensors.
``head``
    An ArrayRecord: the head tensors of a federated head (empty otherwise).
``hook``
    An ArrayRecord: the payload's ``hook_tensors`` (empty unless the algorithm's client
    hooks take tensors, as SCAFFOLD's control variates).

The reply holds ``update``, ``head`` and ``hook`` (ArrayRecords: the uploaded tensors) and
``outcome`` (a ConfigRecord: the client's metrics row, its whole evaluations (after
training, and of the received model before it), its number of training examples and
update metrics). Bytes are counted from the arrays of these
records (fp32 data, no framing), the same measure the simulator uses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.algorithms import Payload, Update
from fedlora.algorithms.base import Tensors
from fedlora.client import ClientOutcome
from fedlora.lora import Layout
from fedlora.tasks import EvalResult

#: Message type of the query that asks a node which fedlora client it is.
QUERY_PARTITION = "query.fedlora_partition"


def as_int(value: object) -> int:
    """An integer field of a record (records type their values loosely)."""
    if not isinstance(value, int):
        raise TypeError(f"expected an integer in the message, got {value!r}")
    return value


def as_float(value: object) -> float:
    """A number field of a record or run config."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def to_record(tensors: Tensors) -> ArrayRecord:
    """Tensors as an ArrayRecord (exact: the bytes of each CPU tensor)."""
    record = ArrayRecord()
    for key, value in tensors.items():
        record[key] = Array(value.detach().cpu().contiguous().numpy())
    return record


def from_record(record: ArrayRecord) -> Tensors:
    """An ArrayRecord back to tensors (writable copies)."""
    return {key: torch.from_numpy(np.array(array.numpy())) for key, array in record.items()}


@dataclass
class TrainInstruction:
    """One client's work for one round, as the client reads it from a message."""

    config_toml: str
    rnd: int
    client: int
    evaluate: bool
    payload: Payload
    head: Tensors
    #: The federation's class names (a node maps the labels of its own data file onto them).
    label_names: list[str]


def train_content(
    config_toml: str,
    rnd: int,
    client: int,
    payload: Payload,
    head: Tensors,
    evaluate: bool,
    label_names: Sequence[str] = (),
) -> RecordDict:
    """The train message for one client."""
    meta = ConfigRecord(
        {
            "config": config_toml,
            "round": rnd,
            "client": client,
            "evaluate": evaluate,
            "layout": json.dumps(payload.layout.to_json()),
            "upload": json.dumps(list(payload.upload)),
            "wire_bytes": json.dumps(payload.wire_bytes),
            "instruction": json.dumps(payload.instruction),
            "lr_multipliers": json.dumps(payload.lr_multipliers),
            "label_names": json.dumps(list(label_names)),
        }
    )
    return RecordDict(
        {
            "fedlora": meta,
            "payload": to_record(payload.tensors),
            "head": to_record(head),
            "hook": to_record(payload.hook_tensors),
        }
    )


def read_train(content: RecordDict) -> TrainInstruction:
    meta = content.config_records["fedlora"]
    payload = Payload(
        layout=Layout.from_json(json.loads(str(meta["layout"]))),
        tensors=from_record(content.array_records["payload"]),
        upload=tuple(json.loads(str(meta["upload"]))),
        wire_bytes=json.loads(str(meta["wire_bytes"])),
        instruction=json.loads(str(meta["instruction"])),
        hook_tensors=from_record(content.array_records["hook"]),
        lr_multipliers={str(k): float(v) for k, v in json.loads(str(meta["lr_multipliers"])).items()},
    )
    return TrainInstruction(
        config_toml=str(meta["config"]),
        rnd=as_int(meta["round"]),
        client=as_int(meta["client"]),
        evaluate=bool(meta["evaluate"]),
        payload=payload,
        head=from_record(content.array_records["head"]),
        label_names=[str(name) for name in json.loads(str(meta["label_names"]))],
    )


def reply_content(outcome: ClientOutcome) -> RecordDict:
    """The reply of a client: what it uploads and what it measured."""
    result, received = outcome.result, outcome.received
    meta = ConfigRecord(
        {
            "row": json.dumps(outcome.row),
            "eval": json.dumps(None if result is None else dataclasses.asdict(result)),
            "eval_received": json.dumps(None if received is None else dataclasses.asdict(received)),
            "num_examples": outcome.update.num_examples,
            "metrics": json.dumps(outcome.update.metrics),
            "trainable_params": outcome.trainable_params,
        }
    )
    return RecordDict(
        {
            "outcome": meta,
            "update": to_record(outcome.update.tensors),
            "head": to_record(outcome.head_upload),
            "hook": to_record(outcome.update.hook_tensors),
        }
    )


def read_reply(content: RecordDict) -> ClientOutcome:
    """A client's reply as the server's :class:`ClientOutcome` (no private state: it stayed there).

    The server counts the round's bytes from the tensors (:mod:`fedlora.traffic`), as the
    simulator does."""
    meta = content.config_records["outcome"]
    update_record = content.array_records["update"]
    head_record = content.array_records["head"]
    row: dict[str, Any] = json.loads(str(meta["row"]))
    result = json.loads(str(meta["eval"]))
    received = json.loads(str(meta["eval_received"]))
    return ClientOutcome(
        update=Update(
            from_record(update_record),
            as_int(meta["num_examples"]),
            json.loads(str(meta["metrics"])),
            from_record(content.array_records["hook"]),
        ),
        head_upload=from_record(head_record),
        private={},
        row=row,
        result=None if result is None else EvalResult(**result),
        trainable_params=as_int(meta["trainable_params"]),
        received=None if received is None else EvalResult(**received),
    )
