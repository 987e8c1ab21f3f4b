"""The server side of a fedlora run on Flower: the simulator's round loop, with clients reached through a Grid.

:class:`FlowerRun` is a :class:`~fedlora.simulation.Simulation` whose
:meth:`~fedlora.simulation.Simulation.run_clients` sends each sampled client its own
payload as a message and reads the replies; sampling, ``configure``, ``aggregate``, the
head policy, global evaluation, metrics, checkpoints and ``summary.json`` are the
simulator's own code. So a run writes the same output contract, and the same config and
seed give the same metrics in both runtimes.

Flower node ids are mapped to fedlora client ids explicitly: the server asks every node
which partition it serves (``query.fedlora_partition``) and sends client ``c``'s round to
the node that answered ``c``. A client that does not reply (its node died, or the round
timed out) is logged and recorded under the round's ``failures``; the others are
aggregated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.algorithms import Payload
from fedlora.algorithms.base import Tensors
from fedlora.client import ClientOutcome
from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.flower.wire import QUERY_PARTITION, as_int, read_reply, train_content
from fedlora.simulation import ClientFailure, Simulation

#: Flower's own logger, so that fedlora's lines appear among Flower's.
log = logging.getLogger("flwr")

#: Seconds between two pulls of replies from the SuperLink.
PULL_INTERVAL = 0.05


@dataclass
class ServerOptions:
    """How the server waits for nodes and replies.

    Attributes
    ----------
    round_timeout
        Seconds to wait for a round's replies; clients that have not replied by then are
        left out of the round (0: wait for every reply or error).
    node_wait
        Seconds to wait at the start for one node per client; after that the run goes on
        with the nodes that came (at least ``federation.min_clients``).
    """

    round_timeout: float = 0.0
    node_wait: float = 120.0


class FlowerRun(Simulation):
    """A fedlora run whose clients are Flower SuperNodes."""

    def __init__(self, config: Config, out_dir: Path, grid: Grid, options: ServerOptions) -> None:
        super().__init__(config, out_dir)
        self.grid = grid
        self.options = options
        self.config_toml = config.to_toml()
        #: fedlora client id -> Flower node id
        self.nodes: dict[int, int] = {}
        #: partition queries not answered yet: message id -> node id
        self.asked: dict[str, int] = {}

    # --- nodes ------------------------------------------------------------------------
    def map_new_nodes(self) -> None:
        """Ask every node not yet mapped which fedlora client it is.

        A node is asked once: a query that times out stays pending and its reply is read
        by a later call. (A second query queued behind the first would reach the node
        later with its context as it was when queued, and the simulation engine would
        write that stale context back over what the node stored in between.)
        """
        known = set(self.nodes.values()) | set(self.asked.values())
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if new:
            queries = [
                Message(RecordDict({"q": ConfigRecord()}), dst_node_id=n, message_type=QUERY_PARTITION) for n in new
            ]
            self.asked.update({i: n for i, n in zip(self.grid.push_messages(queries), new, strict=True) if i})
        if not self.asked:
            return
        replies = self._pull(set(self.asked), timeout=30.0)
        for message_id in replies:
            self.asked.pop(message_id, None)
        for reply in replies.values():
            if reply.has_error():
                continue
            cid = as_int(reply.content.config_records["partition"]["partition-id"])
            node = reply.metadata.src_node_id
            if cid not in self.fed.client_ids:
                log.warning("node %d serves partition %d, which this federation does not have; ignored", node, cid)
                continue
            if cid in self.nodes and self.nodes[cid] != node:
                log.warning("client %d moved from node %d to node %d", cid, self.nodes[cid], node)
            self.nodes[cid] = node

    def connect(self) -> None:
        """Wait until every client has a node (or ``node_wait`` passed with enough of them)."""
        want = len(self.fed.client_ids)
        deadline = time.monotonic() + self.options.node_wait
        while True:
            self.map_new_nodes()
            if len(self.nodes) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(self.nodes) < self.config.federation.min_clients:
            raise FedLoraError(
                f"only {len(self.nodes)} of {want} clients connected within {self.options.node_wait:.0f} s "
                f"(federation.min_clients = {self.config.federation.min_clients}); start one SuperNode per client "
                'with --node-config "partition-id=<i> num-partitions=<N>"'
            )
        missing = sorted(set(self.fed.client_ids) - set(self.nodes))
        if missing:
            log.warning("clients %s have no node; they will be left out of the rounds they are sampled in", missing)

    # --- one round --------------------------------------------------------------------
    def run_clients(
        self, rnd: int, payloads: Mapping[int, Payload], head_payload: Tensors, evaluate: bool
    ) -> dict[int, ClientOutcome | ClientFailure]:
        """Send each client its payload; collect the replies that come back.

        A client without a node, without a reply in time, or whose reply is an error gets a
        :class:`~fedlora.simulation.ClientFailure` (``NoNode``, ``NoReply``, ``ClientError``),
        which the round records under ``failures``.
        """
        self.map_new_nodes()
        messages: list[Message] = []
        outcomes: dict[int, ClientOutcome | ClientFailure] = {}
        for cid, payload in payloads.items():
            node = self.nodes.get(cid)
            if node is None:
                log.warning("round %d: client %d has no node; left out", rnd, cid)
                outcomes[cid] = ClientFailure("NoNode", "no Flower node serves this client")
                continue
            content = train_content(
                self.config_toml, rnd, cid, payload, head_payload, evaluate, self.fed.dataset.label_names
            )
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(rnd)))
        replies = self._exchange(messages, timeout=self.options.round_timeout or None)
        node_to_client = {node: cid for cid, node in self.nodes.items()}
        for msg in messages:
            node = msg.metadata.dst_node_id
            cid = node_to_client[node]
            reply = replies.get(msg.metadata.message_id)
            if reply is None:
                log.warning("round %d: client %d (node %d) did not reply in time; left out", rnd, cid, node)
                outcomes[cid] = ClientFailure("NoReply", f"node {node} did not reply (it died or the round timed out)")
            elif reply.has_error():
                log.warning("round %d: client %d (node %d) failed: %s; left out", rnd, cid, node, reply.error.reason)
                outcomes[cid] = ClientFailure("ClientError", f"node {node}: {reply.error.reason}")
            else:
                outcomes[cid] = read_reply(reply.content)
        return outcomes

    def _exchange(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:
        """Push messages and pull their replies (keyed by the id of the message they answer)."""
        if not messages:
            return {}
        return self._pull({i for i in self.grid.push_messages(messages) if i}, timeout)

    def _pull(self, pending: set[str], timeout: float | None) -> dict[str, Message]:
        """Pull the replies to the messages ``pending`` (ids) until all came or ``timeout`` passed."""
        replies: dict[str, Message] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(pending):
                replies[reply.metadata.reply_to_message_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            if pending:
                time.sleep(PULL_INTERVAL)
        return replies
