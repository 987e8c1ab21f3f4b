"""The FedTreeLoRA motivation experiment on our data (arXiv 2603.13282, Section 3).

(1) Vertical heterogeneity: share only the ``k`` shallowest layers (``sharedepth
    shallow:k``) against only the ``k`` deepest (``deep:k``), beside ``local`` and
    ``fedit``, under Dirichlet(``--vertical-alpha``).
(2) Coupling: sweep the share depth ``d = 0..L`` (``sharedepth shallow:d``; ``d = 0`` is
    local, ``d = L`` is fedit) under each Dirichlet alpha of ``--alphas``, and plot the
    personalized accuracy against ``d``: the best ``d`` should move shallower as alpha
    shrinks (clients grow more heterogeneous).

Every run uses ``configs/default.toml`` with the overrides below; runs already
under ``--out`` with the same settings are read back (``common.run_config``). Writes
``results.json`` and ``results.md`` into ``--out`` (``results_vertical.*`` or
``results_sweep.*`` with ``--part``) and the sweep plot into ``--img-dir``.

Full size (hours on a CPU)::

    python benchmarks/motivation.py --out runs/motivation

Reduced (minutes)::

    python benchmarks/motivation.py --datasets rotten_tomatoes --seeds 0 --rounds 4 \\
        --steps 5 --max-train 100 --max-length 48 --alphas 0.1,10 --depths 0,3,6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import ROOT, accuracies, add_federation_arguments, federation_overrides, int_list, mean_std, run_config


def vertical(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    k = args.k
    methods = {
        "local": ["algorithm.name='local'"],
        f"sharedepth shallow:{k}": ["algorithm.name='sharedepth'", f"algorithm.share='shallow:{k}'"],
        f"sharedepth deep:{k}": ["algorithm.name='sharedepth'", f"algorithm.share='deep:{k}'"],
        "fedit": ["algorithm.name='fedit'"],
    }
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in args.datasets:
        for label, algorithm in methods.items():
            tag = label.replace(" ", "_").replace(":", "")
            summaries = [
                run_config(
                    Path(args.out),
                    f"vertical_{dataset}_{tag}_s{seed}",
                    [*federation_overrides(args, dataset, seed, alpha=args.vertical_alpha), *algorithm],
                )
                for seed in args.seeds
            ]
            table.setdefault(dataset, {})[label] = accuracies(summaries)
    return table


def sweep(args: argparse.Namespace) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for dataset in args.datasets:
        for alpha in args.alphas:
            for depth in args.depths:
                algorithm = ["algorithm.name='sharedepth'", f"algorithm.share='shallow:{depth}'"]
                summaries = [
                    run_config(
                        Path(args.out),
                        f"sweep_{dataset}_a{alpha:g}_d{depth}_s{seed}",
                        [*federation_overrides(args, dataset, seed, alpha=alpha), *algorithm],
                    )
                    for seed in args.seeds
                ]
                table.setdefault(dataset, {}).setdefault(f"{alpha:g}", {})[str(depth)] = accuracies(summaries)
    return table


def plot_sweep(sweep_table: dict[str, dict[str, dict[str, dict[str, Any]]]], img_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for dataset, by_alpha in sweep_table.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for alpha, by_depth in by_alpha.items():
            depths = sorted(int(d) for d in by_depth)
            means = [by_depth[str(d)]["final_mean"] for d in depths]
            stds = [by_depth[str(d)]["final_std"] for d in depths]
            ax.errorbar(depths, means, yerr=stds, marker="o", capsize=3, label=f"alpha = {alpha}")
        ax.set_xlabel("shared depth d (layers 0..d-1 averaged)")
        ax.set_ylabel("final personalized accuracy (%)")
        ax.set_title(f"{dataset}: accuracy vs share depth")
        ax.legend()
        fig.tight_layout()
        path = img_dir / f"{stem}_{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for dataset, methods in results.get("vertical", {}).items():
        lines += [
            f"### Vertical heterogeneity: {dataset}",
            "",
            "| method | final acc (%) | best acc (%) |",
            "|---|---|---|",
        ]
        for label, acc in methods.items():
            lines.append(f"| {label} | {mean_std(acc, 'final')} | {mean_std(acc, 'best')} |")
        lines.append("")
    for dataset, by_alpha in results.get("sweep", {}).items():
        depths = sorted({int(d) for by_depth in by_alpha.values() for d in by_depth})
        lines += [
            f"### Share-depth sweep: {dataset} (final personalized accuracy, %)",
            "",
            "| alpha | " + " | ".join(f"d={d}" for d in depths) + " | best d |",
            "|---" * (len(depths) + 2) + "|",
        ]
        for alpha, by_depth in by_alpha.items():
            cells = [f"{by_depth[str(d)]['final_mean']:.2f}" if str(d) in by_depth else "" for d in depths]
            best = max(by_depth, key=lambda d: by_depth[d]["final_mean"])
            lines.append(f"| {alpha} | " + " | ".join(cells) + f" | {best} |")
        lines.append("")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",")]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/motivation", help="run directories and results.{json,md}")
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "img"), help="where the sweep plots go")
    p.add_argument("--stem", default="motivation_sweep", help="file name stem of the sweep plots")
    p.add_argument("--part", choices=("vertical", "sweep", "all"), default="all")
    add_federation_arguments(p, clients=10, rounds=20)
    p.add_argument("--k", type=int, default=3, help="layers shared in part (1): shallow:k against deep:k")
    p.add_argument("--vertical-alpha", type=float, default=0.5, help="Dirichlet alpha of part (1)")
    p.add_argument("--alphas", type=floats, default=[0.1, 0.5, 1.0, 10.0], help="Dirichlet alphas of part (2)")
    p.add_argument("--depths", type=int_list, default=[0, 1, 2, 3, 4, 5, 6], help="share depths of part (2)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    if args.part in ("vertical", "all"):
        results["vertical"] = vertical(args)
    if args.part in ("sweep", "all"):
        results["sweep"] = sweep(args)
        results["plots"] = [str(p) for p in plot_sweep(results["sweep"], Path(args.img_dir), args.stem)]
    stem = "results" if args.part == "all" else f"results_{args.part}"  # one part never overwrites the other
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
