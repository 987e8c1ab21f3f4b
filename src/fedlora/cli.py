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
from typing import TYPE_CHECKING, Any

from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from types import ModuleType

    from fedlora.config import Config

EXIT_USER_ERROR = 2


def _load(args: argparse.Namespace) -> Config:
    from fedlora.config import load_config

    return load_config(Path(args.config) if args.config else None, args.set)


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.checkpoint import write_atomic
    from fedlora.config import load_config
    from fedlora.experiment import default_run_dir, run_experiment

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
        run_dir = Path(args.out) if args.out else default_run_dir(config)
    summary = run_experiment(
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


def cmd_compare(args: argparse.Namespace) -> int:
    from fedlora.experiment import compare

    result = compare(
        _load(args),
        args.algorithms.split(","),
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        out=Path(args.out) if args.out else None,
        overwrite=args.overwrite,
        reuse=args.reuse,
        jobs=args.jobs,
        quiet=args.quiet,
    )
    print(result.markdown)
    print("run directories:")
    for d in result.run_dirs:
        print(f"  {d}")
    print(f"comparison: {result.out / 'comparison.md'}")
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


def _flower() -> ModuleType:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedLoraError("Flower is not installed; pip install 'fedlora[flower]'") from None
    import fedlora.flower

    return fedlora.flower


def cmd_flower_simulate(args: argparse.Namespace) -> int:
    _flower()
    from fedlora.experiment import default_run_dir, prepare_run_dir
    from fedlora.flower.simulate import simulate

    config = _load(args)
    run_dir = Path(args.out) if args.out else default_run_dir(config, suffix="_flower")
    prepare_run_dir(run_dir, args.overwrite)
    simulate([(config, run_dir)], cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client)
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
    p_cmp.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N runs at once, each in its own process with one torch thread (results as with 1)",
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
    p_sim.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="share of a GPU Ray reserves per ClientApp (0.25: four per GPU); needs run.device 'cuda' or 'auto'",
    )
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
