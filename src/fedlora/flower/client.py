"""The fedlora ClientApp: one fedlora client on a Flower SuperNode.

The node says which client it is through its node config (``partition-id``, set by
Flower's simulation engine or by ``flower-supernode --node-config "partition-id=i
num-partitions=N"``). Each train message carries the run config; the client builds the
same :class:`~fedlora.simulation.Federation` the simulator builds from it (same
partition, seed and model), once per process, and runs exactly the simulator's
:func:`~fedlora.simulation.client_round`. Its private state lives in ``context.state``.
"""

from __future__ import annotations

import zlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import Config, from_dict
from fedlora.errors import FedLoraError
from fedlora.flower.secagg import add_fit_result, client_weight, is_secure_round, secaggplus_when_asked
from fedlora.flower.wire import QUERY_PARTITION, from_record, read_train, reply_content, to_record
from fedlora.simulation import Federation, build_federation


def private_key(config_toml: str) -> str:
    """Where a run's private state lives in ``context.state`` (one entry per run config)."""
    return f"fedlora.private.{zlib.crc32(config_toml.encode()):08x}"


#: The federation of this process, keyed by the config text it was built from.
_FEDERATIONS: dict[str, Federation] = {}


def federation_for(config_toml: str) -> Federation:
    """The federation of a config, built on first use and kept for the process."""
    fed = _FEDERATIONS.get(config_toml)
    if fed is None:
        import tomllib

        config: Config = from_dict(tomllib.loads(config_toml))
        _FEDERATIONS.clear()  # one model per process: a new run replaces the old one
        fed = _FEDERATIONS[config_toml] = build_federation(config)
    return fed


def partition_id(context: Context) -> int:
    """This node's fedlora client id, from its node config."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedLoraError(
            'this SuperNode has no partition-id; start it with --node-config "partition-id=<i> num-partitions=<N>"'
        )
    return int(value)


app = ClientApp(mods=[secaggplus_when_asked])


@app.query(QUERY_PARTITION.split(".", 1)[1])
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which fedlora client this node is."""
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training: exactly the simulator's client code."""
    from fedlora.simulation import client_round

    work = read_train(msg.content)
    me = partition_id(context)
    if work.client != me:
        raise FedLoraError(f"the server sent client {work.client}'s round to the node of client {me}")
    fed = federation_for(work.config_toml)
    key = private_key(work.config_toml)
    private = from_record(context.state.array_records[key]) if key in context.state.array_records else {}
    outcome = client_round(fed, work.rnd, me, work.payload, private, work.head, work.evaluate)
    state: ArrayRecord = to_record(outcome.private)
    context.state[key] = state
    reply = reply_content(outcome)
    if is_secure_round(msg.content):
        weight = client_weight(getattr(fed.algorithm.options, "weighting", None), outcome.update.num_examples)
        add_fit_result(reply, outcome, weight)
    return Message(reply, reply_to=msg)
