"""The fedlora ClientApp: one fedlora client on a Flower SuperNode.

The node says which client it is, and where its data is, through its node config:

``partition-id``
    The fedlora client id (set by Flower's simulation engine, or by ``flower-supernode
    --node-config "partition-id=i num-partitions=N"``).
``data-file`` (optional)
    A CSV or JSONL file on the node's machine holding this client's own examples
    (``--node-config "partition-id=0 data-file='/data/silo0.csv'"``). Without it the node
    is partition ``partition-id`` of the config's catalog data set (simulations, tests).

Each train message carries the run config and the federation's class names; the node
builds its own :class:`~fedlora.client.ClientContext` from them and its data (see
:mod:`fedlora.node`), once per process and run config, never the whole federation, and
runs exactly the simulator's :func:`~fedlora.client.client_round`. Its private state lives
in ``context.state``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client import ClientContext
from fedlora.config import Config, from_dict
from fedlora.errors import FedLoraError
from fedlora.flower.wire import QUERY_PARTITION, from_record, read_train, reply_content, to_record

#: Flower's own logger, so that fedlora's lines appear in the SuperNode's log.
log = logging.getLogger("flwr")


def private_key(config_toml: str) -> str:
    """Where a run's private state lives in ``context.state`` (one entry per run config)."""
    return f"fedlora.private.{zlib.crc32(config_toml.encode()):08x}"


#: This process's client context, keyed by what it was built from.
_CONTEXTS: dict[tuple[str, int, str], ClientContext] = {}


def context_for(config_toml: str, client: int, data_file: str | None, label_names: Sequence[str]) -> ClientContext:
    """The client context of a config and the node's data, built on first use and kept for the process."""
    key = (config_toml, client, data_file or "")
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        import tomllib

        from fedlora.node import node_context

        config: Config = from_dict(tomllib.loads(config_toml))
        _CONTEXTS.clear()  # one model per process: a new run replaces the old one
        path = Path(data_file) if data_file else None
        where = f"its own file {path}" if path else f"partition {client} of {config.data.dataset}"
        log.info("fedlora: client %d builds its context from %s", client, where)
        ctx = _CONTEXTS[key] = node_context(config, client, path, label_names)
    return ctx


def partition_id(context: Context) -> int:
    """This node's fedlora client id, from its node config."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedLoraError(
            'this SuperNode has no partition-id; start it with --node-config "partition-id=<i> num-partitions=<N>"'
        )
    return int(value)


def data_file(context: Context) -> str | None:
    """The node's own data file (``data-file`` in its node config), if it names one."""
    value = context.node_config.get("data-file")
    return str(value) if value else None


app = ClientApp()


@app.query(QUERY_PARTITION.split(".", 1)[1])
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which fedlora client this node is."""
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training: exactly the simulator's client code."""
    from fedlora.client import client_round

    work = read_train(msg.content)
    me = partition_id(context)
    if work.client != me:
        raise FedLoraError(f"the server sent client {work.client}'s round to the node of client {me}")
    ctx = context_for(work.config_toml, me, data_file(context), work.label_names)
    key = private_key(work.config_toml)
    private = from_record(context.state.array_records[key]) if key in context.state.array_records else {}
    outcome = client_round(ctx, work.rnd, work.payload, private, work.head, work.evaluate)
    state: ArrayRecord = to_record(outcome.private)
    context.state[key] = state
    return Message(reply_content(outcome), reply_to=msg)
