"""The ``fedlora`` command: run, compare, list, report, export, evaluate, flower.

Every mistake a user can make (config, files, names, shapes) ends in one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

EXIT_USER_ERROR = 2


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _run_dir(config: Any, out: str | None, suffix: str = "") -> Path:
    if out:
        return Path(out)
    return Path(config.run.out) / f"{config.run.name}_{config.algorithm_name}_s{config.run.seed}{suffix}"


def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedLoraError(
                f"{run_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, "
                "or choose another --out"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run_one(
    config: Any, run_dir: Path, *, resume: bool, overwrite: bool, quiet: bool = False, last_good: bool = False
) -> dict[str, Any]:
    """Run (or resume) one configuration into ``run_dir`` with a progress bar.

    ``last_good``: when resuming, skip a damaged latest checkpoint for the newest intact one.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedlora.checkpoint import write_atomic
    from fedlora.report import draw_run
    from fedlora.simulation import Simulation, sample_clients

    if not resume:
        _prepare_dir(run_dir, overwrite)
    console = _console()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task("loading", total=None, status="")
        state: dict[str, Any] = {"last": ""}

        def on_progress(rnd: int, client: int | None) -> None:
            if client is None:
                row = sim.log.rows()[-1]
                acc = row.get("personalized_acc_mean")
                glob = row.get("global_acc")
                state["last"] = (f"round {rnd + 1}: pers {acc:.3f}" if acc is not None else f"round {rnd + 1}") + (
                    f" global {glob:.3f}" if glob is not None else ""
                )
                progress.update(task, status=state["last"])
            else:
                progress.advance(task)

        sim = Simulation(config, run_dir, on_progress)
        if resume:
            sim.resume(last_good=last_good)
        else:
            write_atomic(run_dir / "config.toml", config.to_toml().encode())
        ids = sim.fed.client_ids
        total = sum(len(sample_clients(config, ids, r)) for r in range(config.run.rounds))
        done = sum(len(sample_clients(config, ids, r)) for r in range(sim.next_round))
        progress.update(task, description=f"{config.algorithm_name} s{config.run.seed}", total=total, completed=done)
        summary = sim.run()
    draw_run(run_dir)
    return summary


#: Settings a run directory may differ in and still be reused: where it lives and how long it runs.
_REUSABLE_DIFFERENCES = {"run.name", "run.out", "run.rounds"}


def _settings(config: Any) -> dict[str, Any]:
    """Every setting of ``config`` as ``section.key``, the algorithm's options with their defaults filled in."""
    import dataclasses

    from fedlora.algorithms import get_algorithm, parse_options

    sections = config.to_dict()
    options = parse_options(get_algorithm(config.algorithm_name), config.algorithm_options)
    sections["algorithm"] = {"name": config.algorithm_name, **dataclasses.asdict(options)}
    return {f"{section}.{key}": value for section, keys in sections.items() for key, value in keys.items()}


def reuse_run(config: Any, run_dir: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Run ``config`` into ``run_dir``, reusing what the directory holds; return the summary.

    An empty or missing directory gets a fresh run. A run with the same settings is
    returned as it is when it has ``config.run.rounds`` rounds, continued from its latest
    checkpoint when it was interrupted, and extended when it is shorter (exact: no
    algorithm depends on the total number of rounds). A run with other settings, a longer
    run, or a directory that holds something else is refused.
    """
    from fedlora.checkpoint import write_atomic
    from fedlora.config import load_config

    saved_file = run_dir / "config.toml"
    if not saved_file.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FedLoraError(
                f"{run_dir} is not empty but holds no fedlora run; pass --overwrite or choose another --out"
            )
        return run_one(config, run_dir, resume=False, overwrite=False, quiet=quiet)
    saved = load_config(saved_file)
    old, new = _settings(saved), _settings(config)
    differs = sorted(k for k in old.keys() | new.keys() if k not in _REUSABLE_DIFFERENCES and old.get(k) != new.get(k))
    if differs:
        shown = ", ".join(f"{k} = {old.get(k)!r} there, {new.get(k)!r} here" for k in differs[:3])
        raise FedLoraError(
            f"{run_dir} holds a run with other settings ({shown}); pass --overwrite or choose another --out"
        )
    if saved.run.rounds > config.run.rounds:
        raise FedLoraError(
            f"{run_dir} holds a {saved.run.rounds}-round run, asked for {config.run.rounds}; "
            "pass --overwrite or choose another --out"
        )
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary: dict[str, Any] = json.loads(summary_file.read_text())
        if summary["rounds"] == config.run.rounds:
            return summary
    write_atomic(saved_file, config.to_toml().encode())
    return run_one(config, run_dir, resume=True, overwrite=False, quiet=quiet)


def _load(args: argparse.Namespace) -> Any:
    from fedlora.config import load_config

    return load_config(Path(args.config) if args.config else None, args.set)


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.checkpoint import write_atomic
    from fedlora.config import load_config

    if args.resume_from_last_good and not args.resume:
        raise FedLoraError("--resume-from-last-good goes with --resume DIR")
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise FedLoraError(f"{run_dir} has no config.toml: is it a fedlora run directory?")
        config = load_config(saved, args.set)
        write_atomic(run_dir / "config.toml", config.to_toml().encode())
    else:
        config = _load(args)
        run_dir = _run_dir(config, args.out)
    summary = run_one(
        config,
        run_dir,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        quiet=args.quiet,
        last_good=args.resume_from_last_good,
    )
    _print_summary(summary, run_dir)
    return 0


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from fedlora.report import metric_label

    final = summary["final"] or {}
    acc = final.get("personalized_acc_mean")
    glob = final.get("global_acc")
    label = metric_label(summary)
    parts = [f"{summary['algorithm']}: {summary['rounds']} rounds in {summary['wall_seconds']:.0f} s"]
    if acc is not None:
        parts.append(f"personalized {label} trained {acc:.4f} ± {final['personalized_acc_std']:.4f}")
    received = final.get("personalized_acc_mean_received")
    if received is not None:
        parts.append(f"personalized {label} received {received:.4f} ± {final['personalized_acc_std_received']:.4f}")
    if glob is not None:
        parts.append(f"global {label} {glob:.4f}")
    print("; ".join(parts))
    print(f"run directory: {run_dir}")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` (values read as TOML) -> (name, options)."""
    import tomllib

    name, *pairs = spec.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FedLoraError(f"--algorithms entry {spec!r}: expected name:key=value, e.g. fedtreelora:fixed_k=4")
        key, text = pair.split("=", 1)
        try:
            options[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = text
    return name.strip(), options


def cmd_compare(args: argparse.Namespace) -> int:
    from fedlora.algorithms import get_algorithm, parse_options
    from fedlora.config import load_config
    from fedlora.report import comparison_table

    base = _load(args)
    specs = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.run.seed]
    variants: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, options = parse_variant(spec)
        algorithm = (
            {**base.algorithm, **options, "name": name} if name == base.algorithm_name else {**options, "name": name}
        )
        parse_options(get_algorithm(name), {k: v for k, v in algorithm.items() if k != "name"})
        variants[spec] = algorithm
    out = Path(args.out) if args.out else Path(base.run.out) / f"{base.run.name}_compare"

    def run_dir_of(spec: str, seed: int) -> Path:
        return out / f"{spec.replace(':', '_').replace('=', '-')}_s{seed}"

    if args.reuse and args.overwrite:
        raise FedLoraError("--reuse keeps the runs --overwrite would replace: pass one of them")
    if not args.overwrite and not args.reuse:
        taken = [out / f for f in ("comparison.md", "comparison.json") if (out / f).exists()]
        taken += [d for d in (run_dir_of(v, s) for v in variants for s in seeds) if d.exists() and any(d.iterdir())]
        if taken:
            raise FedLoraError(
                f"{taken[0]} already exists; pass --overwrite to replace the comparison, or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict[str, Any]]] = {}
    run_dirs: list[Path] = []
    for spec, algorithm in variants.items():
        for seed in seeds:
            config = load_config(Path(args.config) if args.config else None, [*args.set, f"run.seed={seed}"])
            config.algorithm = dict(algorithm)
            run_dir = run_dir_of(spec, seed)
            summaries.setdefault(spec, []).append(
                reuse_run(config, run_dir, quiet=args.quiet)
                if args.reuse
                else run_one(config, run_dir, resume=False, overwrite=args.overwrite, quiet=args.quiet)
            )
            run_dirs.append(run_dir)
    table, data = comparison_table(summaries)
    header = (
        f"# Comparison: {base.data.dataset}, {base.model.name}, {base.data.num_clients} clients, "
        f"{base.run.rounds} rounds, seeds {seeds}\n\nAccuracies in % (mean ± std over seeds when several). "
        "Personalized scores by protocol: *trained* = each client after its local training, *received* = "
        "each client on the model it was sent, before training (eval.personalized).\n\n"
    )
    (out / "comparison.md").write_text(header + table)
    (out / "comparison.json").write_text(json.dumps(data, indent=2))
    print(header + table)
    print("run directories:")
    for d in run_dirs:
        print(f"  {d}")
    print(f"comparison: {out / 'comparison.md'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedlora.algorithms import registry
    from fedlora.data import DATASET_CATALOG, PARTITIONERS, USER_DATASET_FORMS
    from fedlora.models import MODEL_CATALOG

    console = Console()
    sections = {
        "algorithms": {name: cls.description for name, cls in registry().items()},
        "models": MODEL_CATALOG,
        "datasets": {**DATASET_CATALOG, **USER_DATASET_FORMS},
        "partitioners": PARTITIONERS,
    }
    for title, entries in sections.items():
        table = Table(title=title, show_header=False, title_justify="left")
        for name, description in entries.items():
            table.add_row(f"[bold]{name}[/bold]", description)
        console.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.report import draw_run, draw_runs

    run_dirs = [Path(d) for d in args.run_dir]
    if args.compare:
        labels = args.labels.split(",") if args.labels else None
        print(draw_runs(run_dirs, Path(args.compare), labels))
        return 0
    if args.labels:
        raise FedLoraError("--labels goes with --compare OUT.png")
    for run_dir in run_dirs:
        for path in draw_run(run_dir):
            print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedlora.export import export_adapter, export_merged

    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not args.overwrite:
            raise FedLoraError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out")
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        else:
            out_dir.unlink()
    if args.merged:
        out = export_merged(Path(args.run_dir), client=args.client, out_dir=out_dir)
        print(f"wrote merged transformers model to {out}")
        return 0
    out = export_adapter(Path(args.run_dir), client=args.client, out_dir=out_dir, rank=args.rank)
    print(f"wrote peft adapter to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlora.evaluate import evaluate_run

    results = [evaluate_run(Path(d), client=args.client) for d in args.run_dirs]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print("\n\n".join(r.table() for r in results))
    return 0


def _flower() -> Any:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedLoraError("Flower is not installed; pip install 'fedlora[flower]'") from None
    import fedlora.flower

    return fedlora.flower


def cmd_flower_simulate(args: argparse.Namespace) -> int:
    _flower()
    from fedlora.flower.simulate import simulate

    config = _load(args)
    run_dir = _run_dir(config, args.out, suffix="_flower")
    _prepare_dir(run_dir, args.overwrite)
    simulate([(config, run_dir)], cpus_per_client=args.cpus_per_client)
    _print_summary(json.loads((run_dir / "summary.json").read_text()), run_dir)
    return 0


def cmd_flower_certs(args: argparse.Namespace) -> int:
    _flower()
    from fedlora.flower.certs import make_certificates

    certs = make_certificates(Path(args.dir), hosts=args.host or ["127.0.0.1", "localhost"], days=args.days)
    for path in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning of transformers with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("config", nargs=None if required else "?", help="TOML config file")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
        p.add_argument("--out", help="output directory")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p_run = sub.add_parser("run", help="run one federated experiment")
    config_args(p_run, required=False)
    p_run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p_run.add_argument(
        "--resume-from-last-good",
        action="store_true",
        help="with --resume: if the latest checkpoint is damaged, continue from the newest intact one",
    )
    p_run.set_defaults(func=cmd_run)

    p_cmp = sub.add_parser("compare", help="run several algorithms (and seeds) and tabulate them")
    config_args(p_cmp, required=True)
    p_cmp.add_argument(
        "--algorithms",
        required=True,
        help="comma-separated algorithms, each optionally with options: fedit,fedtreelora:fixed_k=4:tau=0.3",
    )
    p_cmp.add_argument("--seeds", help="comma-separated seeds (default: run.seed)")
    p_cmp.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs with the same settings; continue interrupted ones, extend shorter ones",
    )
    p_cmp.set_defaults(func=cmd_compare)

    p_list = sub.add_parser("list", help="algorithms, models, datasets and partitioners")
    p_list.set_defaults(func=cmd_list)

    p_rep = sub.add_parser(
        "report", help="redraw the plots of run directories, or draw several runs on one figure (--compare)"
    )
    p_rep.add_argument("run_dir", nargs="+")
    p_rep.add_argument(
        "--compare", metavar="OUT.png", help="one figure of all the runs: personalized score and test loss by round"
    )
    p_rep.add_argument(
        "--labels",
        help="comma-separated legend labels for --compare, one per run (default: algorithm); "
        "runs with the same label are drawn as their mean with a +-1 std band",
    )
    p_rep.set_defaults(func=cmd_report)

    p_exp = sub.add_parser("export", help="export a client's (or the global) model: peft adapter or merged weights")
    p_exp.add_argument("run_dir")
    p_exp.add_argument("--client", type=int, default=None, help="client id (default: the global model)")
    p_exp.add_argument("--out", required=True, help="adapter (or model) directory to write")
    p_exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    form = p_exp.add_mutually_exclusive_group()
    form.add_argument("--merged", action="store_true", help="write the merged model (transformers save_pretrained)")
    form.add_argument("--rank", type=int, default=None, help="write a peft LoRA of this rank (truncated SVD)")
    p_exp.set_defaults(func=cmd_export)

    p_ev = sub.add_parser(
        "evaluate", help="score a run's global (or one client's) model per class, with who holds each class"
    )
    p_ev.add_argument("run_dirs", nargs="+", metavar="run_dir")
    p_ev.add_argument("--client", type=int, default=None, help="client id (default: the global model)")
    p_ev.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    p_ev.set_defaults(func=cmd_evaluate)

    p_fl = sub.add_parser("flower", help="run on Flower (pip install 'fedlora[flower]'; see docs/deploy.md)")
    fl = p_fl.add_subparsers(dest="flower_command", required=True)
    p_sim = fl.add_parser("simulate", help="run a config through Flower's simulation engine (one SuperNode per client)")
    config_args(p_sim, required=True)
    p_sim.add_argument("--cpus-per-client", type=float, default=1.0, help="CPUs Ray reserves per ClientApp")
    p_sim.set_defaults(func=cmd_flower_simulate)
    p_certs = fl.add_parser("certs", help="write a self-signed CA and SuperLink certificate (for trials and tests)")
    p_certs.add_argument("dir", help="directory to write ca.crt, ca.key, server.pem, server.key")
    p_certs.add_argument(
        "--host", action="append", help="SuperLink IP or DNS name the certificate is valid for (repeatable)"
    )
    p_certs.add_argument("--days", type=int, default=365, help="validity in days")
    p_certs.set_defaults(func=cmd_flower_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "run" and not args.config and not args.resume:
        parser.error("run needs a CONFIG file or --resume DIR")
    try:
        return int(args.func(args))
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedlora: interrupted; continue with --resume <run dir>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
