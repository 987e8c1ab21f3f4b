"""Server cost of FedTreeLoRA's clustering: distances, the trees, every layer's cut.

Random B factors (no model): ``--clients`` clients, ``--layers`` layers of two modules
(query and value) of ``--d-out`` x ``--rank``; ``--groups`` planted groups in the deeper
half of the layers. Times, best of ``--repeats``, on one thread:

- ``distances``: :func:`layer_distances` (per-layer Frobenius distances from the whole B
  factors and from their even and odd entries: float32 Gram matrices);
- ``plan``: :func:`plan_tree` at the default options (average-linkage tree of the global
  distance, the calibrated cut: a second tree on the ``fit`` distances and, per layer, up
  to 99 within-cluster relabellings tested on the ``test`` distances, a sequential test
  that stops once a split cannot pass); ``--cut threshold`` for
  the paper's rule;
- ``fit``: :func:`tree_fit` (the cophenetic correlation that ``rebuild_fit`` checks each round).

Times are CPU seconds of this process (``time.process_time``, one thread): on a machine
shared with other jobs they stay close to the unloaded wall time, which the wall clock
(also printed) does not.

The server step after warmup (or a rebuild) is distances + plan; a round with the drift
check is distances + fit. Budget: the whole step under 1 s for 1,000 clients and 12 layers.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fedtreelora_server_cost.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.algorithms.fedtreelora import FedTreeLoraOptions, layer_distances, plan_tree, tree_fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-out", type=int, default=384, help="module output size (MiniLM-L6: 384)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--groups", type=int, default=4, help="planted client groups in the deeper half of the layers")
    p.add_argument("--cut", default="calibrated", choices=["calibrated", "threshold"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
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
    options = FedTreeLoraOptions(cut=args.cut)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        times = {}
        wall = time.perf_counter()
        start = time.process_time()
        distances = layer_distances(b_factors, options.distance)
        times["distances"] = time.process_time() - start
        start = time.process_time()
        tree = plan_tree(distances, list(range(n)), options)
        times["plan"] = time.process_time() - start
        start = time.process_time()
        fit = tree_fit(tree, distances.full)
        times["fit"] = time.process_time() - start
        wall = time.perf_counter() - wall
        print(", ".join(f"{k} {v:.2f} s" for k, v in times.items()) + f" (CPU); wall {wall:.2f} s", flush=True)
        best = {k: min(v, best.get(k, float("inf"))) for k, v in times.items()}
    print(f"cluster counts per layer: {tree.counts}; tree fit {fit if fit is None else round(fit, 3)}")
    build = best["distances"] + best["plan"]
    check = best["distances"] + best["fit"]
    print(
        f"{n} clients, {args.layers} layers, cut {args.cut}, best of {args.repeats} (CPU s): "
        f"distances {best['distances']:.2f} s, "
        f"plan {best['plan']:.2f} s, fit {best['fit']:.3f} s; server step with a (re)build {build:.2f} s, "
        f"with the drift check only {check:.2f} s (budget 1 s)"
    )


if __name__ == "__main__":
    main()
