"""ffa: FFA-LoRA, federated LoRA with A frozen.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (arXiv
2403.12313). ``A`` stays at its shared seeded init on every client (it is never sent:
each client regenerates it from the seed); only ``B`` is trained, uploaded and averaged.
Because ``A`` is common, ``mean_w(B_k) A = mean_w(B_k A)``: the average is exact.

Options
-------
weighting : "examples" (default) or "uniform"
"""

from __future__ import annotations

from fedlora.algorithms.base import register
from fedlora.algorithms.fedit import FedIt


@register
class Ffa(FedIt):
    name = "ffa"
    description = "FFA-LoRA: A frozen at the shared seeded init, only B trained and averaged (exact)"
    paper = "arXiv 2403.12313"
    train_a = False
