"""Server cost of FedTreeLoRA's clustering: distances, the tree and every layer's cut.

Random B factors (no model): ``--clients`` clients, ``--layers`` layers of two modules
(query and value) of ``--d-out`` x ``--rank``. Times :func:`layer_distances` (per-layer
Frobenius distances from the B factors) and :func:`plan_tree` (average-linkage tree of the
global distance, then the per-layer counts by silhouette, shallow to deep), the work the
server does once after warmup (and every ``rebuild_every`` rounds). Budget: under 10 s for
1,000 clients and 12 layers.

    PYTHONPATH=src python benchmarks/fedtreelora_server_cost.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.algorithms.fedtreelora import FedTreeLoraOptions, layer_distances, plan_tree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-out", type=int, default=384, help="module output size (MiniLM-L6: 384)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--groups", type=int, default=4, help="planted client groups in the deeper half of the layers")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    n = args.clients
    group = torch.arange(n) % args.groups
    centers = torch.randn(args.groups, args.d_out, args.rank, generator=gen)
    b_factors = []
    for layer in range(args.layers):
        modules = []
        for _ in range(2):
            noise = torch.randn(n, args.d_out, args.rank, generator=gen)
            planted = centers[group] if layer >= args.layers // 2 else 0.0
            modules.append(noise + planted)
        b_factors.append(modules)
    options = FedTreeLoraOptions()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        distances = layer_distances(b_factors, options.distance)
        t_dist = time.perf_counter() - start
        tree = plan_tree(distances, list(range(n)), options)
        total = time.perf_counter() - start
        best = min(best, total)
        print(f"distances {t_dist:.2f} s, tree + cuts {total - t_dist:.2f} s, total {total:.2f} s")
    print(f"cluster counts per layer: {tree.counts}")
    print(f"{n} clients, {args.layers} layers: best of {args.repeats} = {best:.2f} s (budget 10 s)")


if __name__ == "__main__":
    main()
