"""flexlora: FlexLoRA, heterogeneous ranks by SVD truncation of a dense server update.

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources" (arXiv 2402.11505).

The server keeps a dense update ``dW`` per module (initially zero). Client ``k`` gets the
rank-``r_k`` truncated SVD of ``dW`` as LoRA factors (``B = U_r S_r / s_k``,
``A = V_r^T``; zero singular values take the standard LoRA init), trains, and uploads
``(A_k, B_k)``. The new update *replaces* the old one:

    dW <- sum_k q_k s_k B_k A_k

so each client's truncation residual is lost every round (FedHL's point of comparison).
The result is ``W0 + dW``.

Options
-------
weighting : "examples" (default, ``q_k = n_k / sum n`` over the round's participants) or "uniform"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.algorithms.base import Payload, Update, WeightingOptions, register
from fedlora.algorithms.lowrank import DenseUpdateAlgorithm, stacked_product


@register
class FlexLora(DenseUpdateAlgorithm):
    name = "flexlora"
    description = "FlexLoRA: dense server update, rank-r_k SVD truncation per client, mean of client products"
    paper = "arXiv 2402.11505"
    options_class = WeightingOptions
    options: WeightingOptions

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return self.truncation_payloads(self.svds(rnd), clients)

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        if not updates:
            return
        clients = sorted(updates)
        weights = self.weights(clients, self.options.weighting)
        for mid, dw in self.delta.items():
            factors = [self.client_factors(updates[c], mid, c) for c in clients]
            b_st, a_st = stacked_product(factors, [weights[c] for c in clients])
            dw.copy_(b_st @ a_st)

    def structure(self) -> dict[str, Any]:
        return {"ranks": {str(c): r for c, r in self.ctx.ranks.items()}}
