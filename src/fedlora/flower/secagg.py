"""Secure aggregation on Flower with Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

With ``privacy.secure_aggregation = true`` a round's uploads reach the server only as
their weighted sum: every client masks its upload (adapters and federated head, keys
sorted, flattened) with pairwise and private masks that cancel in the sum (Bell et al.
2020, SecAgg+), and the server unmasks the sum alone. The workflow is Flower's, driven
round by round by :class:`SecAggFlowerRun`; the client runs Flower's ``secaggplus_mod``
in front of fedlora's ``train`` (:func:`secaggplus_when_asked`), which clears every
tensor record of the reply before it leaves the node.

The server then holds, for each client of the round, the same tensors: the weighted
mean. Feeding those to the algorithm's ``aggregate`` gives the secure mean exactly for
methods whose aggregate is a weighted mean of all uploads with one shape for everyone
(:data:`SECURE_AGGREGATION_METHODS`); the others need individual updates (a client tree,
clusters, norm- or error-based weights, products or stacks of each client's factors,
per-client ranks) and are refused with the reason.

Precision: SecAgg+ quantizes ``weight_k / max_weight * upload_k`` stochastically into
``2**22`` levels over ``[-8, 8]`` (Flower's defaults; ``max_weight`` is the round's
largest weight, so every quantized term moves by less than ``16 / 2**22 ~ 3.8e-6``) and
the weights into ``2**22`` levels. The random rounding makes a secure run not
bit-reproducible; its metrics equal the plain run's to that tolerance.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedlora.algorithms import Payload, Update, get_algorithm, parse_options
from fedlora.algorithms.base import Tensors
from fedlora.client import ClientOutcome
from fedlora.config import Config, from_dict
from fedlora.errors import FedLoraError
from fedlora.flower.run import FlowerRun
from fedlora.flower.wire import as_int, train_content
from fedlora.heads import is_head_key
from fedlora.simulation import ClientFailure
from fedlora.tasks import EvalResult
from fedlora.validation import expected_upload

log = logging.getLogger("flwr")

#: Methods whose aggregate is a weighted mean of every client's upload, all of one shape.
SECURE_AGGREGATION_METHODS = frozenset(
    {"fedit", "ffa", "fedsa", "sharedepth", "feddpa", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
)

#: Why the other methods cannot run on a sum alone.
NEEDS_INDIVIDUAL_UPDATES = {
    "fedtreelora": "builds its client tree from each client's B factors and averages per cluster",
    "fedlease": "clusters clients by their B factors and averages per cluster",
    "fedalt": "sends each client the mean of the *other* clients' local LoRAs",
    "fedhl": "needs each client's product B_k A_k against its own rank-r_k truncation",
    "flexlora": "averages the products B_k A_k of each client's factors",
    "flora": "stacks every client's factors into the base update",
    "fedex": "folds the residual of each client's product B_k A_k into the base weight",
    "hetlora": "weights each client by the norm of its own update, at its own rank",
    "zeropad": "zero-pads each client's factors from its own rank",
    "local": "uploads nothing",
    "scaffold": "uploads control variates beside the model, which this SecAgg+ round does not sum",
}


def secure_aggregation_problem(config: Config) -> str | None:
    """Why ``config`` cannot run with secure aggregation, or ``None`` if it can."""
    name = config.algorithm_name
    if name not in SECURE_AGGREGATION_METHODS:
        why = NEEDS_INDIVIDUAL_UPDATES.get(name, "is not known to aggregate a weighted mean of all uploads")
        return (
            f"privacy.secure_aggregation: {name} {why}, which a server that only sees the sum of the uploads "
            f"cannot do; secure aggregation runs {', '.join(sorted(SECURE_AGGREGATION_METHODS))}"
        )
    if config.privacy.mode == "central":
        return (
            "privacy.secure_aggregation hides each update from the server, so the server cannot clip them for "
            "central DP; use privacy.mode = 'local' (each client clips and noises its own update) with it"
        )
    if config.federation.clip_update_norm > 0:
        return "privacy.secure_aggregation hides each update's norm: set federation.clip_update_norm = 0"
    return None


def weighting_of(config: Config) -> str | None:
    """The run's ``algorithm.weighting`` (the algorithm's default when the config leaves it out)."""
    options = parse_options(get_algorithm(config.algorithm_name), config.algorithm_options)
    return getattr(options, "weighting", None)


def client_weight(config_toml: str, num_examples: int) -> int:
    """A client's integer weight in the secure sum: its example count, or 1 under uniform weighting."""
    return 1 if weighting_of(from_dict(tomllib.loads(config_toml))) == "uniform" else num_examples


def flatten(tensors: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """Tensors as float64 arrays in sorted key order (the layout every client shares)."""
    return [tensors[k].detach().double().numpy() for k in sorted(tensors)]


def add_fit_result(reply: RecordDict, outcome: ClientOutcome, weight: int) -> None:
    """Give a fedlora reply the legacy ``fitres.*`` records ``secaggplus_mod`` masks.

    The upload (adapters and head) goes in ``fitres.parameters``; the mod replaces it by
    its masked vector and clears every tensor record. The client's metrics row stays in
    the reply's ``outcome`` record.
    """
    uploaded = {**outcome.update.tensors, **outcome.head_upload}
    params = ndarrays_to_parameters(flatten(uploaded))
    reply.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(params, keep_input=False)
    reply.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    reply.config_records["fitres.metrics"] = ConfigRecord(dict(reply.config_records["outcome"]))
    reply.config_records["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})


def secaggplus_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the train messages of a SecAgg+ round; the others pass through."""
    if msg.metadata.message_type.startswith("train") and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_round(content: RecordDict) -> bool:
    """Whether a train message is the masked-upload stage of a SecAgg+ round."""
    return RECORD_KEY_CONFIGS in content.config_records


class _Round(Strategy):
    """The fit part of one fedlora round, in the legacy Strategy shape the SecAgg+ workflow drives."""

    def __init__(self, grid: Grid, contents: Mapping[int, RecordDict]) -> None:
        self.grid = grid
        self.contents = contents
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # The fit instructions are placeholders: the workflow's node -> content map is
        # replaced by fedlora's own train messages (see SecAggFlowerRun).
        return [(GridClientProxy(node, self.grid, 0), FitIns(Parameters([], ""), {})) for node in self.contents]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        self.failures = list(failures)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending fedlora's train message to each node in the masking stage."""

    def __init__(self, contents: Mapping[int, RecordDict], max_weight: float, timeout: float | None) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=0.5, max_weight=max_weight, timeout=timeout)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {node: self.contents[node] for node in state.nid_to_fitins}
        return bool(ok)


class SecAggFlowerRun(FlowerRun):
    """A Flower run whose rounds aggregate through SecAgg+: the server sees the weighted mean only."""

    secure_aggregation = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problem = secure_aggregation_problem(self.config)
        if problem is not None:
            raise FedLoraError(problem)

    def run_clients(
        self, rnd: int, payloads: Mapping[int, Payload], head_payload: Tensors, evaluate: bool
    ) -> dict[int, ClientOutcome | ClientFailure]:
        """One SecAgg+ round: every client's outcome carries the round's secure mean as its update."""
        self.map_new_nodes()
        outcomes: dict[int, ClientOutcome | ClientFailure] = {}
        contents: dict[int, RecordDict] = {}
        for cid, payload in payloads.items():
            node = self.nodes.get(cid)
            if node is None:
                outcomes[cid] = ClientFailure("NoNode", "no Flower node serves this client")
                continue
            contents[node] = train_content(self.config_toml, rnd, cid, payload, head_payload, evaluate)
        if len(contents) < 2:
            for cid in payloads:
                outcomes.setdefault(cid, ClientFailure("SecAggHalted", "SecAgg+ needs at least 2 clients in a round"))
            return outcomes
        uniform = weighting_of(self.config) == "uniform"
        node_to_client = {node: cid for cid, node in self.nodes.items()}
        max_weight = 1 if uniform else max(self.fed.ctx.num_examples[node_to_client[n]] for n in contents)
        strategy = _Round(self.grid, contents)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=strategy,
            client_manager=SimpleClientManager(),
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        _Workflow(contents, float(max_weight), self.options.round_timeout or None)(self.grid, context)
        answered = {proxy.node_id: res for proxy, res in strategy.results if isinstance(proxy, GridClientProxy)}
        for node in contents:
            cid = node_to_client[node]
            res = answered.get(node)
            if res is None:
                outcomes[cid] = ClientFailure("SecAggHalted", f"node {node} is not in the round's secure sum")
                continue
            outcomes[cid] = self._outcome(payloads[cid], res)
        return outcomes

    def _outcome(self, payload: Payload, res: FitRes) -> ClientOutcome:
        """A client's outcome from its reply's metrics and the round's unmasked mean."""
        meta = res.metrics
        mean = parameters_to_ndarrays(res.parameters)
        shapes = self._upload_shapes(payload)
        keys = sorted(shapes)
        if len(mean) != len(keys):
            raise FedLoraError(f"SecAgg+ returned {len(mean)} arrays for {len(keys)} uploaded tensors")
        tensors = {
            k: torch.from_numpy(np.asarray(a, dtype=np.float64)).float().reshape(shapes[k])
            for k, a in zip(keys, mean, strict=True)
        }
        row: dict[str, Any] = json.loads(str(meta["row"]))
        result = json.loads(str(meta["eval"]))
        received = json.loads(str(meta["eval_received"]))
        return ClientOutcome(
            update=Update(
                {k: v for k, v in tensors.items() if not is_head_key(k)},
                as_int(meta["num_examples"]),
                json.loads(str(meta["metrics"])),
            ),
            head_upload={k: v for k, v in tensors.items() if is_head_key(k)},
            private={},
            row=row,
            result=None if result is None else EvalResult(**result),
            trainable_params=as_int(meta["trainable_params"]),
            received=None if received is None else EvalResult(**received),
        )

    def _upload_shapes(self, payload: Payload) -> dict[str, tuple[int, ...]]:
        head = self.fed.head.payload()
        return dict(expected_upload(payload, self.fed.ctx.module_shapes, {k: tuple(v.shape) for k, v in head.items()}))
