"""flora: FLoRA, stacking heterogeneous-rank LoRAs into the frozen base weight.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (arXiv 2409.05976).

Each round the server stacks the participants' factors, ``B_st = [s_1 B_1 .. s_m B_m]``
and ``A_st = [q_1 A_1; ..; q_m A_m]``, so that ``B_st A_st = sum_k q_k s_k B_k A_k``
exactly, whatever the ranks and module shapes. Every client merges the stacks into its
frozen base weight (``W = W0 + sum over rounds of B_st A_st``) and starts a fresh LoRA of
its own rank each round (the standard seeded init: ``A`` Kaiming-uniform, ``B = 0``).

Communication: the simulator hands the client the merged dense update (``base.dW``), but
what FLoRA sends is the stacked factors. A client's download is therefore counted as the
bytes of every round's stack it has not received yet: the previous round's stack for a
client that took part then, all the stacks it missed under partial participation. The
stack grows with the number of participants (``(d_out + d_in) sum_k r_k`` per module).

Options
-------
weighting : "examples" (default, ``q_k = n_k / sum n`` over the round's participants) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.algorithms.base import FederationContext, Options, Payload, Update, WeightingOptions, register
from fedlora.algorithms.lowrank import DenseUpdateAlgorithm, stacked_product

FP32_BYTES = 4


@register
class Flora(DenseUpdateAlgorithm):
    name = "flora"
    description = "FLoRA: stack client LoRAs (exact mean of products), merge into the base, fresh LoRA per round"
    paper = "arXiv 2409.05976"
    options_class = WeightingOptions
    options: WeightingOptions

    def __init__(self, ctx: FederationContext, options: Options) -> None:
        super().__init__(ctx, options)
        #: Bytes of each aggregated round's stacked factors (index = round).
        self.stack_bytes: list[int] = []
        #: First round whose stack a client has not received (0: it holds W0 only).
        self.synced_until: dict[int, int] = {}

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        dense = self.delta_tensors()
        return {
            c: Payload(
                self.rank_layout(self.ctx.ranks[c], folded=True),
                dense,
                wire_bytes=sum(self.stack_bytes[self.synced_until.get(c, 0) : rnd]),
            )
            for c in clients
        }

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        clients = sorted(updates)
        weights = self.weights(clients, self.options.weighting) if clients else {}
        stack_bytes = 0
        for mid, dw in self.delta.items():
            factors = [self.client_factors(updates[c], mid, c) for c in clients]
            if not factors:
                continue
            b_st, a_st = stacked_product(factors, [weights[c] for c in clients])
            dw.addmm_(b_st, a_st)
            stack_bytes += (b_st.numel() + a_st.numel()) * FP32_BYTES
        self.stack_bytes.extend([0] * (rnd + 1 - len(self.stack_bytes)))
        self.stack_bytes[rnd] = stack_bytes
        for c in clients:
            self.synced_until[c] = rnd

    def structure(self) -> dict[str, Any]:
        return {"ranks": {str(c): r for c, r in self.ctx.ranks.items()}, "stack_bytes": self.stack_bytes}

    def meta(self) -> dict[str, Any]:
        return {"stack_bytes": self.stack_bytes, "synced_until": {str(c): r for c, r in self.synced_until.items()}}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.stack_bytes = [int(b) for b in meta["stack_bytes"]]
        self.synced_until = {int(c): int(r) for c, r in meta["synced_until"].items()}
