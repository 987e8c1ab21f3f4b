"""local: no communication; every client trains its own LoRA (the personalization floor).

Each client starts from the shared seeded LoRA init and keeps everything it trains as
private state; nothing is uploaded or downloaded. Options: none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora.algorithms.base import Algorithm, Payload, Update, register


@register
class Local(Algorithm):
    name = "local"
    description = "no communication: each client trains its own LoRA (personalization floor)"
    mixed_ranks = True

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        return {c: Payload(self.lora_layout(self.ctx.ranks[c]), {}, upload=()) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, Update]) -> None:
        return None
