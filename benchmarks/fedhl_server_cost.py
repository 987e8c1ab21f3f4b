"""FedHL server cost: one aggregation round on a large model, timed.

Builds a FedHL server for ``--modules`` dense modules of ``--dim x --dim`` (fp32, a
random dense ``dW``: the worst case for the SVD) and ``--clients`` clients with ranks
``--ranks`` (round-robin), then times one round of server work: ``configure`` (one
top-``r_max`` SVD per module, ``torch.svd_lowrank`` at this size, and every client's
truncation factors) and ``aggregate`` (truncation errors, optimal weights and the
unbiased increment of every module). Client training is not included.

    python benchmarks/fedhl_server_cost.py --modules 64 --dim 4096 --clients 10 --ranks 2,4,8,16

Memory: ``modules x dim^2 x 4`` bytes for ``dW`` (4.3 GB at the defaults) plus small
factors.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.algorithms import FederationContext, Update
from fedlora.algorithms.fedhl import FedHl, FedHlOptions
from fedlora.lora import ModuleId


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=64)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    modules = {ModuleId(i // 2, ("query", "value")[i % 2]): (args.dim, args.dim) for i in range(args.modules)}
    clients = list(range(args.clients))
    ctx = FederationContext(
        client_ids=clients,
        num_examples={c: 100 for c in clients},
        module_shapes=modules,
        rank=max(ranks),
        alpha=2.0 * max(ranks),
        ranks={c: ranks[c % len(ranks)] for c in clients},
        seed=0,
        rounds=2,
    )
    algo = FedHl(ctx, FedHlOptions())
    gen = torch.Generator().manual_seed(0)
    for dw in algo.delta.values():
        dw.copy_(torch.randn(dw.shape, generator=gen) * 1e-3)
    start = time.perf_counter()
    payloads = algo.configure(1, clients)
    configured = time.perf_counter()
    # Clients "train": their factors move a little.
    updates = {
        c: Update({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in p.tensors.items()}, 100)
        for c, p in payloads.items()
    }
    aggregate_start = time.perf_counter()
    algo.aggregate(1, updates)
    done = time.perf_counter()
    configure_s = configured - start
    aggregate_s = done - aggregate_start
    print(
        f"{args.modules} modules of {args.dim}x{args.dim}, {args.clients} clients of ranks {ranks} "
        f"(r_max {max(ranks)}), {torch.get_num_threads()} torch threads"
    )
    print(f"configure (SVDs + truncations): {configure_s:.1f} s")
    print(f"aggregate (errors, weights, unbiased increment): {aggregate_s:.1f} s")
    print(f"server round total: {configure_s + aggregate_s:.1f} s")


if __name__ == "__main__":
    main()
