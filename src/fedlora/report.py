"""Plots of a run directory (learning curves, plus each algorithm's pictures of the
``structure`` it returned) and the comparison table of several runs.

Figures are :class:`matplotlib.figure.Figure` objects written straight to files: no pyplot
and no global backend, so importing this module (or drawing a run from a notebook) leaves
the notebook's backend alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedlora.errors import FedLoraError
from fedlora.metrics import LAST_EVALUATIONS, RECEIVED, aggregate_rows, read_metrics


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise FedLoraError(f"{run_dir} has no summary.json: is it a finished fedlora run directory?")
    return json.loads(summary_file.read_text()), read_metrics(run_dir / "metrics.jsonl")


def metric_label(summary: Mapping[str, Any]) -> str:
    """Short name of a run's score: ``acc`` (classification) or ``rouge1`` (generation)."""
    metric = str(summary.get("metric", "accuracy"))
    return "acc" if metric == "accuracy" else metric


#: The evaluation protocols as table labels and key suffixes (see ``fedlora.metrics``).
PROTOCOLS = (("trained", ""), ("received", RECEIVED))


def _evaluated(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The aggregate rows of the rounds that were evaluated (by either protocol)."""
    return [
        r
        for r in aggregate_rows(rows)
        if any(r.get(f"personalized_acc_mean{suffix}") is not None for _, suffix in PROTOCOLS)
    ]


def _protocol_suffix(agg: Sequence[Mapping[str, Any]]) -> str:
    """The key suffix of the protocol a single curve shows: "trained" where measured, else "received"."""
    trained = any(r.get("personalized_acc_mean") is not None for r in agg)
    return "" if trained or not agg else RECEIVED


def _save(fig: Any, axes: Sequence[Any], out: Path) -> Path:
    """Grid and legend on every axis, then write ``fig`` to ``out`` and close it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def draw_learning_curves(rows: Sequence[Mapping[str, Any]], title: str, out: Path, metric: str = "accuracy") -> Path:
    agg = _evaluated(rows)
    fig = Figure(figsize=(10, 3.8))
    ax_acc, ax_loss = fig.subplots(1, 2)
    rounds = np.array([r["round"] + 1 for r in agg])
    for name, suffix in PROTOCOLS:
        if not agg or agg[0].get(f"personalized_acc_mean{suffix}") is None:
            continue
        mean = np.array([r[f"personalized_acc_mean{suffix}"] for r in agg])
        std = np.array([r[f"personalized_acc_std{suffix}"] for r in agg])
        ax_acc.plot(rounds, mean, marker="o", label=f"personalized {name} (mean over clients)")
        ax_acc.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        worst = [r[f"personalized_acc_min{suffix}"] for r in agg]
        ax_acc.plot(rounds, worst, ls=":", label=f"personalized {name} (worst client)")
        loss = [r[f"personalized_loss_mean{suffix}"] for r in agg]
        ax_loss.plot(rounds, loss, marker="o", label=f"test loss (personalized {name})")
    if len(agg):
        if any(r["global_acc"] is not None for r in agg):
            ax_acc.plot(rounds, [r["global_acc"] for r in agg], marker="s", label="global model")
        ax_loss.plot(rounds, [r["train_loss"] for r in agg], marker="o", label="train loss (mean)")
    ax_acc.set(xlabel="round", ylabel=metric, title=title)
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    return _save(fig, (ax_acc, ax_loss), out)


def draw_run(run_dir: Path) -> list[Path]:
    """(Re)draw every plot of a run into ``run_dir/plots``."""
    summary, rows = load_run(run_dir)
    plots = run_dir / "plots"
    title = f"{summary['algorithm']} on {summary['dataset']} ({summary['model']})"
    metric = str(summary.get("metric", "accuracy"))
    drawn = [draw_learning_curves(rows, title, plots / "learning_curves.png", metric)]
    structure = summary.get("structure", {})
    if structure.get("cluster_counts"):
        drawn.append(draw_cluster_counts(structure["cluster_counts"], plots / "clusters_per_layer.png"))
        if structure.get("linkage"):
            drawn.append(draw_dendrogram(structure["linkage"], structure["clients"], plots / "client_tree.png"))
    if structure.get("weights") and "truncation_errors" in structure:
        drawn.append(draw_fedhl_weights(structure, plots / "fedhl_weights.png"))
    if any(r.get("lambda_mean") is not None for r in aggregate_rows(rows)):
        drawn.append(draw_lambdas(rows, plots / "lambda.png"))
    if structure.get("tree_history"):
        drawn.append(
            draw_tree_history(structure["tree_history"], structure.get("tree_fit", []), plots / "tree_history.png")
        )
    return drawn


def draw_lambdas(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """FedTreeLoRA: the mixing weight lambda per round (mean over the clients and modules
    that reported one, with its range): 1 = cluster expert only, 0 = external expert only."""
    agg = [r for r in aggregate_rows(rows) if r.get("lambda_mean") is not None]
    rounds = [r["round"] + 1 for r in agg]
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    ax.plot(rounds, [r["lambda_mean"] for r in agg], marker="o", label="mean")
    ax.fill_between(rounds, [r["lambda_min"] for r in agg], [r["lambda_max"] for r in agg], alpha=0.2, label="range")
    ax.set(xlabel="round", ylabel="lambda (weight of the cluster expert)", title="mixing weight", ylim=(0, 1))
    return _save(fig, [ax], out)


def draw_cluster_counts(counts: Sequence[int], out: Path) -> Path:
    """FedTreeLoRA: bar chart of clusters per layer, shallow to deep (the paper's Figure 4)."""
    fig = Figure(figsize=(max(4.0, 0.5 * len(counts) + 2), 3.2))
    ax = fig.subplots()
    ax.bar(range(len(counts)), counts, color="tab:green")
    ax.set(xlabel="layer (0 = shallowest)", ylabel="clusters", title="clusters per layer")
    ax.set_xticks(range(len(counts)))
    ax.set_yticks(range(max(counts, default=1) + 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def draw_dendrogram(linkage: Sequence[Sequence[float]], clients: Sequence[int], out: Path) -> Path:
    """FedTreeLoRA: the client tree as a dendrogram, leaves labelled by client id."""
    from scipy.cluster.hierarchy import dendrogram

    fig = Figure(figsize=(max(5.0, 0.3 * len(clients) + 2), 3.6))
    ax = fig.subplots()
    dendrogram(np.asarray(linkage, dtype=np.float64), labels=[str(c) for c in clients], ax=ax)
    ax.set(xlabel="client", ylabel="distance (mean over layers)", title="client tree")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def draw_fedhl_weights(structure: Mapping[str, Any], out: Path) -> Path:
    """FedHL: each client's aggregation weight per round, labelled by its rank."""
    weights = structure["weights"]
    ranks = structure.get("ranks", {})
    clients = sorted({c for w in weights.values() for c in w}, key=int)
    rounds = sorted(weights, key=int)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for c in clients:
        xs = [int(r) for r in rounds if c in weights[r]]
        ax.plot(xs, [weights[str(r)][c] for r in xs], marker="o", label=f"client {c} (r={ranks.get(c, '?')})")
    ax.set_xlabel("round")
    ax.set_ylabel("aggregation weight p_k")
    ax.set_title(f"FedHL weights ({structure.get('weighting', '')})")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def draw_tree_history(history: Sequence[Mapping[str, Any]], fit: Sequence[Sequence[Any]], out: Path) -> Path:
    """A client tree's partitions over time: clusters per layer at every (re)build, and
    the tree's cophenetic fit to the clients after every round where it was checked."""
    fig = Figure(figsize=(10, 3.6))
    ax_counts, ax_fit = fig.subplots(1, 2)
    for event in history:
        counts = event["cluster_counts"]
        ax_counts.plot(range(len(counts)), counts, marker="o", label=f"round {event['round'] + 1} ({event['reason']})")
    ax_counts.set(xlabel="layer (0 = shallowest)", ylabel="clusters", title="partitions at each (re)build")
    checked = [(r + 1, f) for r, f in fit if f is not None]
    if checked:
        ax_fit.plot(*zip(*checked, strict=True), marker="o", label="cophenetic correlation")
    rebuilt = [(e["round"] + 1, e["fit"]) for e in history if e.get("fit") is not None]
    if rebuilt:
        ax_fit.scatter(*zip(*rebuilt, strict=True), color="tab:red", zorder=3, label="rebuilt (drift)")
    ax_fit.set(xlabel="round", ylabel="fit of the tree", title="tree against the clients' distances")
    if not checked:
        ax_fit.text(0.5, 0.5, "not checked (rebuild_fit = 0)", ha="center", va="center", transform=ax_fit.transAxes)
    return _save(fig, [ax for ax in (ax_counts, ax_fit) if ax.get_legend_handles_labels()[0]], out)


def run_curves(run_dir: Path) -> dict[str, Any]:
    """A run's per-round personalized score and test loss (evaluated rounds only, rounds from 1),
    after local training where the run measured it, else before (``protocol`` says which)."""
    summary, rows = load_run(run_dir)
    agg = _evaluated(rows)
    suffix = _protocol_suffix(agg)
    return {
        "algorithm": str(summary["algorithm"]),
        "metric": str(summary.get("metric", "accuracy")),
        "protocol": "trained" if not suffix else "received",
        "rounds": [int(r["round"]) + 1 for r in agg],
        "score": [float(r[f"personalized_acc_mean{suffix}"]) for r in agg],
        "loss": [r[f"personalized_loss_mean{suffix}"] for r in agg],
    }


def group_curves(curves: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Runs with the same label as one curve: the mean and population std over the runs.

    Only the rounds every run of the group evaluated are kept; a round without a test loss
    in some run gets no loss (None). Groups come in the order their labels first appear.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for label, curve in zip(labels, curves, strict=True):
        groups.setdefault(label, []).append(curve)
    out = []
    for label, members in groups.items():
        rounds = sorted(set.intersection(*(set(c["rounds"]) for c in members)))
        at = [{r: i for i, r in enumerate(c["rounds"])} for c in members]
        scores = np.array([[c["score"][idx[r]] for r in rounds] for c, idx in zip(members, at, strict=True)])
        losses = [[c["loss"][idx[r]] for c, idx in zip(members, at, strict=True)] for r in rounds]
        out.append(
            {
                "label": label,
                "runs": len(members),
                "metric": members[0]["metric"],
                "rounds": rounds,
                "score_mean": scores.mean(axis=0).tolist(),
                "score_std": scores.std(axis=0).tolist(),
                "loss_mean": [float(np.mean(ls)) if None not in ls else None for ls in losses],
            }
        )
    return out


def draw_runs(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """One figure of several runs: personalized score (mean over clients) and personalized test
    loss against the round, one line per run (labelled by ``labels`` or the algorithm name).

    Runs given the same label (several seeds of one method) are drawn as one line, their
    mean, with a band of one standard deviation over the runs around the score.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise FedLoraError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run directory")
    curves = [run_curves(d) for d in run_dirs]
    if labels is None:  # every run its own line, even two runs of one algorithm (numbered)
        names = [str(c["algorithm"]) for c in curves]
        labels = [n if names.count(n) == 1 else f"{n} #{names[: i + 1].count(n)}" for i, n in enumerate(names)]
    fig = Figure(figsize=(10, 3.8))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for g in group_curves(curves, labels):
        label = g["label"] + (f" (mean of {g['runs']} runs)" if g["runs"] > 1 else "")
        mean, std = np.array(g["score_mean"]), np.array(g["score_std"])
        (line,) = ax_acc.plot(g["rounds"], mean, marker="o", ms=3, label=label)
        if g["runs"] > 1:
            ax_acc.fill_between(g["rounds"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
        loss = [np.nan if v is None else v for v in g["loss_mean"]]
        ax_loss.plot(g["rounds"], loss, marker="o", ms=3, label=label)
    metric = curves[0]["metric"] if curves else "accuracy"
    ax_acc.set(xlabel="round", ylabel=f"personalized {metric} (mean over clients)")
    ax_loss.set(xlabel="round", ylabel="personalized test loss")
    return _save(fig, (ax_acc, ax_loss), out)


def _mean_std(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    arr = 100 * np.array(vals)
    if len(arr) == 1:
        return f"{arr[0]:.2f}"
    return f"{arr.mean():.2f} ± {arr.std():.2f}"


def _final_groups(run: Mapping[str, Any], suffix: str = "") -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = (run.get("final") or {}).get(f"personalized_groups{suffix}") or {}
    return groups


def _best_key(suffix: str) -> str:
    return "best" if not suffix else f"best{suffix}"


def comparison_table(summaries: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Markdown table and JSON of several algorithms' summaries (mean ± std over seeds).

    Each evaluation protocol that some run measured gets its columns, labelled: the final
    and best personalized score "trained" (after local training) and "received" (the model
    each client was sent, before training). Generation runs name their score (``rouge1``)
    in the header and add one column per task group and protocol: the final personalized
    score of that group's test examples.
    """
    runs_all = [run for runs in summaries.values() for run in runs]
    first = runs_all[0] if runs_all else {}
    label = metric_label(first)
    metric = str(first.get("metric", "accuracy"))
    protocols = [
        (name, suffix)
        for name, suffix in PROTOCOLS
        if any((run.get("final") or {}).get(f"personalized_acc_mean{suffix}") is not None for run in runs_all)
    ]
    group_names = {
        suffix: sorted({g for run in runs_all for g in _final_groups(run, suffix)}) for _, suffix in protocols
    }
    head = "| algorithm |"
    for name, suffix in protocols:
        head += f" personalized {label} {name} (final) | mean of last {LAST_EVALUATIONS} {name} |"
        head += f" personalized {label} {name} (best) | best round {name} |"
        head += "".join(f" {g} {label} {name} (final) |" for g in group_names[suffix])
    head += f" global {label} (final) | upload / round | download / round | trainable % | wall s "
    head += "| peak RSS | peak accel. mem |"
    lines = [head, "|---|" + "---|" * (head.count("|") - 2)]
    data: dict[str, Any] = {}
    for algo, runs in summaries.items():
        cells = ""
        entry: dict[str, Any] = {"seeds": [s["seed"] for s in runs], "protocols": [name for name, _ in protocols]}
        for _, suffix in protocols:
            key = f"personalized_acc_mean{suffix}"
            finals = [(s["final"] or {}).get(key) for s in runs]
            lasts = [(s.get("last") or {}).get(key) for s in runs]
            bests = [(s.get(_best_key(suffix)) or {}).get("row", {}).get(key) for s in runs]
            best_rounds = [s[_best_key(suffix)]["round"] + 1 for s in runs if s.get(_best_key(suffix))]
            per_group = {
                g: [_final_groups(s, suffix).get(g, {}).get(metric) for s in runs] for g in group_names[suffix]
            }
            cells += f" {_mean_std(finals)} | {_mean_std(lasts)} | {_mean_std(bests)} |"
            cells += f" {','.join(map(str, best_rounds))} |"
            cells += "".join(f" {_mean_std(v)} |" for v in per_group.values())
            entry[f"personalized_acc{suffix}_final"] = finals
            entry[f"personalized_acc{suffix}_last"] = lasts
            entry[f"personalized_acc{suffix}_best"] = bests
            entry[f"best_round{suffix}"] = best_rounds
            if per_group:
                entry[f"personalized_groups{suffix}_final"] = per_group
        globals_ = [s["final"]["global_acc"] for s in runs]
        rounds = [s["rounds"] for s in runs]
        up = float(np.mean([s["bytes_up_total"] / r for s, r in zip(runs, rounds, strict=True)]))
        down = float(np.mean([s["bytes_down_total"] / r for s, r in zip(runs, rounds, strict=True)]))
        trainable = runs[0].get("trainable_percent")
        wall = float(np.mean([s["wall_seconds"] for s in runs]))
        peak_rss = _largest([s.get("peak_rss_bytes") for s in runs])
        peak_accel = _largest([s.get("peak_accel_bytes") for s in runs])
        lines.append(
            f"| {algo} |{cells} {_mean_std(globals_)} | {_human_bytes(up)} | {_human_bytes(down)} "
            f"| {trainable:.3f} | {wall:.0f} | {format_bytes(peak_rss)} | {format_bytes(peak_accel)} |"
        )
        data[algo] = {
            **entry,
            "global_acc_final": globals_,
            "bytes_up_per_round": up,
            "bytes_down_per_round": down,
            "trainable_percent": trainable,
            "wall_seconds": wall,
            "peak_rss_bytes": peak_rss,
            "peak_accel_bytes": peak_accel,
        }
    return "\n".join(lines) + "\n", data


def _largest(values: Sequence[int | None]) -> int | None:
    """The largest known value (runs before memory was measured have none)."""
    known = [int(v) for v in values if v is not None]
    return max(known) if known else None


def format_bytes(n: int | None) -> str:
    """``12.3 MB`` and the like; ``n/a`` for an unknown size."""
    return "n/a" if n is None else _human_bytes(n)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
