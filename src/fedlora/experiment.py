"""Experiments as library code: run one configuration, or compare several algorithms.

The ``fedlora run`` and ``fedlora compare`` commands are thin wrappers over these
functions; a notebook or a benchmark script calls the same code and gets the summary back::

    from pathlib import Path
    from fedlora.config import load_config
    from fedlora.experiment import compare, run_experiment

    config = load_config(Path("configs/smoke.toml"), ["run.rounds=2"])
    summary = run_experiment(config, Path("runs/smoke"), overwrite=True)
    print(summary["final"]["personalized_acc_mean"])

    result = compare(config, ["fedit", "fedtreelora:warmup_rounds=1"], out=Path("runs/cmp"), jobs=2)
    print(result.markdown)
    result.summaries["fedit"][0]["final"]

A summary is the content of the run directory's ``summary.json`` (see
:func:`fedlora.simulation.summarize`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fedlora.config import Config
from fedlora.errors import FedLoraError

__all__ = ["Comparison", "compare", "default_run_dir", "parse_variant", "reuse_run", "run_experiment"]

#: What a finished run reports: the content of its ``summary.json``.
Summary = dict[str, Any]

#: Settings a run directory may differ in and still be reused: where it lives and how long it runs.
_REUSABLE_DIFFERENCES = {"run.name", "run.out", "run.rounds"}


def default_run_dir(config: Config, suffix: str = "") -> Path:
    """Where a run of ``config`` goes when no directory is named: ``<out>/<name>_<algorithm>_s<seed>``."""
    return Path(config.run.out) / f"{config.run.name}_{config.algorithm_name}_s{config.run.seed}{suffix}"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create ``run_dir``; a directory holding something is replaced only when ``overwrite``."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedLoraError(
                f"{run_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, "
                "or choose another --out"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run_experiment(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
    last_good: bool = False,
) -> Summary:
    """Run (or resume) one configuration into ``run_dir`` and return its summary.

    Parameters
    ----------
    config
        The experiment (see :func:`fedlora.config.load_config`).
    run_dir
        Where the metrics, checkpoints, plots and ``summary.json`` go.
    resume
        Continue the run in ``run_dir`` from its latest checkpoint.
    overwrite
        Replace a run ``run_dir`` already holds (otherwise that is an error).
    quiet
        No progress bar (the default for library use; the CLI shows one).
    last_good
        When resuming, skip a damaged latest checkpoint for the newest intact one.

    Returns
    -------
    Summary
        The run's ``summary.json``: final and best scores, bytes, wall time, structure.
    """
    from rich.console import Console
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
        prepare_run_dir(run_dir, overwrite)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task("loading", total=None, status="")

        def on_progress(rnd: int, client: int | None) -> None:
            if client is not None:
                progress.advance(task)
                return
            row = sim.log.rows()[-1]
            acc = row.get("personalized_acc_mean")
            glob = row.get("global_acc")
            status = f"round {rnd + 1}: pers {acc:.3f}" if acc is not None else f"round {rnd + 1}"
            progress.update(task, status=status + (f" global {glob:.3f}" if glob is not None else ""))

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


def _settings(config: Config) -> dict[str, Any]:
    """Every setting of ``config`` as ``section.key``, the algorithm's options with their defaults filled in."""
    from fedlora.algorithms import get_algorithm, parse_options

    sections = config.to_dict()
    options = parse_options(get_algorithm(config.algorithm_name), config.algorithm_options)
    sections["algorithm"] = {"name": config.algorithm_name, **dataclasses.asdict(options)}
    return {f"{section}.{key}": value for section, keys in sections.items() for key, value in keys.items()}


def reuse_run(config: Config, run_dir: Path, *, quiet: bool = True) -> Summary:
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
        return run_experiment(config, run_dir, quiet=quiet)
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
        summary: Summary = json.loads(summary_file.read_text())
        if summary["rounds"] == config.run.rounds:
            return summary
    write_atomic(saved_file, config.to_toml().encode())
    return run_experiment(config, run_dir, resume=True, quiet=quiet)


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` (values read as TOML) -> (name, options)."""
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


@dataclass
class Comparison:
    """What :func:`compare` returns (and writes to ``out``).

    ``summaries`` maps each algorithm spec to its runs' summaries, one per seed in seed
    order; ``run_dirs`` lists the run directories in the same order; ``markdown`` is
    ``comparison.md`` and ``table`` the JSON of ``comparison.json``.
    """

    out: Path
    seeds: list[int]
    summaries: dict[str, list[Summary]]
    run_dirs: list[Path]
    markdown: str
    table: dict[str, Any]


def _variant_config(base: Config, spec: str, seed: int) -> Config:
    """``base`` with the algorithm of ``spec`` and ``run.seed = seed``.

    Options given in ``spec`` are laid over ``base``'s algorithm options when it names
    the same algorithm, and over the defaults otherwise.
    """
    from fedlora.algorithms import get_algorithm, parse_options

    name, options = parse_variant(spec)
    algorithm = (
        {**base.algorithm, **options, "name": name} if name == base.algorithm_name else {**options, "name": name}
    )
    parse_options(get_algorithm(name), {k: v for k, v in algorithm.items() if k != "name"})
    config = copy.deepcopy(base)
    config.algorithm = algorithm
    config.run.seed = seed
    return config


def variant_dir(out: Path, spec: str, seed: int) -> Path:
    """The run directory of one algorithm spec and seed inside a comparison's ``out``."""
    return out / f"{spec.replace(':', '_').replace('=', '-')}_s{seed}"


def _run_variant(config: Config, run_dir: Path, reuse: bool, overwrite: bool, quiet: bool) -> Summary:
    if reuse:
        return reuse_run(config, run_dir, quiet=quiet)
    return run_experiment(config, run_dir, overwrite=overwrite, quiet=quiet)


def _run_variant_in_worker(config: Config, run_dir: Path, reuse: bool, overwrite: bool) -> Summary:
    """One run of a ``jobs > 1`` comparison, in its own process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    return _run_variant(config, run_dir, reuse, overwrite, quiet=True)


def compare(
    base: Config,
    algorithms: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    reuse: bool = False,
    jobs: int = 1,
    quiet: bool = True,
) -> Comparison:
    """Run several algorithms (and seeds) on one configuration and tabulate them.

    Parameters
    ----------
    base
        The shared configuration; each run replaces its algorithm and ``run.seed``.
    algorithms
        Algorithm specs: ``name`` or ``name:key=value:...`` (``fedtreelora:fixed_k=4``).
    seeds
        The seeds to run each algorithm with (default: ``base.run.seed``).
    out
        The comparison directory (default ``<run.out>/<run.name>_compare``): one run
        directory per spec and seed, ``comparison.md`` and ``comparison.json``.
    overwrite
        Replace runs and a comparison ``out`` already holds.
    reuse
        Keep finished runs with the same settings, continue interrupted ones, extend
        shorter ones (see :func:`reuse_run`).
    jobs
        How many runs at once, each in its own process with one torch thread. Runs are
        deterministic per seed, so the results equal those of ``jobs = 1``.
    quiet
        No progress bars (with ``jobs > 1`` there are none; one line per finished run).

    Returns
    -------
    Comparison
        Every run's summary and directory, and the table.
    """
    from fedlora.report import comparison_table

    if reuse and overwrite:
        raise FedLoraError("--reuse keeps the runs --overwrite would replace: pass one of them")
    if jobs < 1:
        raise FedLoraError(f"--jobs {jobs}: give at least 1 (how many runs at once)")
    specs = [a.strip() for a in algorithms if a.strip()]
    if not specs:
        raise FedLoraError("--algorithms names no algorithm; give e.g. fedit,fedtreelora")
    seed_list = list(seeds) if seeds else [base.run.seed]
    out = out if out is not None else Path(base.run.out) / f"{base.run.name}_compare"
    runs = [
        (spec, seed, _variant_config(base, spec, seed), variant_dir(out, spec, seed))
        for spec in specs
        for seed in seed_list
    ]
    if not overwrite and not reuse:
        taken = [out / f for f in ("comparison.md", "comparison.json") if (out / f).exists()]
        taken += [d for *_, d in runs if d.exists() and any(d.iterdir())]
        if taken:
            raise FedLoraError(
                f"{taken[0]} already exists; pass --overwrite to replace the comparison, or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        results = [_run_variant(config, run_dir, reuse, overwrite, quiet) for _, _, config, run_dir in runs]
    else:
        # spawn, not fork: a forked child inherits the parent's torch thread pool state
        with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_run_variant_in_worker, config, run_dir, reuse, overwrite) for *_, config, run_dir in runs
            ]
            results = []
            try:
                for (spec, seed, _, _), future in zip(runs, futures, strict=True):
                    results.append(future.result())
                    if not quiet:
                        print(f"{spec} s{seed}: done in {results[-1]['wall_seconds']:.0f} s", flush=True)
            except BaseException:
                # one run failed (or the user interrupted): start no further runs
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    summaries: dict[str, list[Summary]] = {}
    for (spec, *_), summary in zip(runs, results, strict=True):
        summaries.setdefault(spec, []).append(summary)
    table, data = comparison_table(summaries)
    header = (
        f"# Comparison: {base.data.dataset}, {base.model.name}, {base.data.num_clients} clients, "
        f"{base.run.rounds} rounds, seeds {seed_list}\n\nAccuracies in % (mean ± std over seeds when several). "
        "Personalized scores by protocol: *trained* = each client after its local training, *received* = "
        "each client on the model it was sent, before training (eval.personalized).\n\n"
    )
    (out / "comparison.md").write_text(header + table)
    (out / "comparison.json").write_text(json.dumps(data, indent=2))
    return Comparison(
        out=out,
        seeds=seed_list,
        summaries=summaries,
        run_dirs=[d for *_, d in runs],
        markdown=header + table,
        table=data,
    )
