"""FedTreeLoRA against local and fedit, and its ablations, on real text classification.

The federation of ``comparison.py`` (the paper's Table 1 setting on this project's
offline assets: MiniLM-L6, 20 clients, Dirichlet(0.5) label skew, rank 4 on query and
value, frozen shared classifier head, ``rotten_tomatoes`` and ``bbc_news``, 3 seeds),
with the same arguments and the same run directories: a ``local``, ``fedit`` or
``fedtreelora`` run made by either script is read back by the other when both get the
same ``--out``. Methods: ``local``, ``fedit``, ``fedtreelora``, its ablations
(``fixed_k`` 1 and 4, ``independent_layers``, ``no_external``) and the ``centralized``
reference (one client with all the training data, the federation's total steps).
Opt-in sensitivity variants (name them in ``--methods``): ``warmup_rounds=4``, ``tau=0.1``,
``lambda_lr_mult=100`` and ``cut=calibrated`` (the permutation-calibrated cut instead of
the paper's threshold), the three knobs to turn when fedtreelora trails ``local``; their
values are sized for the reduced runs (``--warmup-rounds 2``, tau 0.2, multiplier 10).
Variants of fedtreelora combine with ``+``: ``no_external+tau=0.1`` is the ablation at the
lower split threshold (its run directory is ``DATASET_no_external+tau0.1_sSEED``).

Writes ``OUT/fedtreelora_nlu.{md,json}``: the columns of ``comparison.py`` (both
protocols, final and mean of the last 4 evaluations), the paper's numbers beside, and the
paired per-seed differences of fedtreelora (the adaptive cut) minus each ablation and
minus fedit.

Full size (many hours on CPU)::

    PYTHONPATH=src python benchmarks/fedtreelora_nlu.py --out runs/comparison
"""

from __future__ import annotations

from comparison import CENTRALIZED, parser, run_table, write

#: Variant name -> (algorithm, extra config overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "local": ("local", []),
    "fedit": ("fedit", []),
    "fedtreelora": ("fedtreelora", []),
    "fixed_k=1": ("fedtreelora", ["algorithm.fixed_k=1"]),
    "fixed_k=4": ("fedtreelora", ["algorithm.fixed_k=4"]),
    "independent_layers": ("fedtreelora", ["algorithm.independent_layers=true"]),
    "no_external": ("fedtreelora", ["algorithm.no_external=true"]),
    CENTRALIZED: (CENTRALIZED, []),
}

#: Sensitivity variants, run only when named in ``--methods``: a 4-round warmup (longer than
#: the reduced runs' 2, shorter than the full size's 5), a lower split threshold than the
#: default 0.2, a 10x faster mixing scalar.
SENSITIVITY: dict[str, tuple[str, list[str]]] = {
    "warmup_rounds=4": ("fedtreelora", ["algorithm.warmup_rounds=4"]),
    "tau=0.1": ("fedtreelora", ["algorithm.cut='threshold'", "algorithm.tau=0.1"]),
    "lambda_lr_mult=100": ("fedtreelora", ["algorithm.lambda_lr_mult=100.0"]),
    "cut=calibrated": ("fedtreelora", ["algorithm.cut='calibrated'"]),
}

#: The FedTreeLoRA paper's GLUE averages (RoBERTa-large, 20 clients, Dirichlet 0.5, rank 4).
PAPER = {
    "fedit": 87.20,
    "fedtreelora": 92.36,
    "fixed_k=1": 87.20,
    "fixed_k=4": 91.45,
    "independent_layers": 89.47,
    "no_external": 91.40,
}


def variant(name: str) -> tuple[str, list[str]]:
    """The algorithm and overrides of ``name``: one known variant, or fedtreelora variants
    joined by ``+`` (their overrides concatenated, left to right)."""
    known = {**VARIANTS, **SENSITIVITY}
    parts = name.split("+")
    unknown = [part for part in parts if part not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(known)}")
    if len(parts) == 1:
        return known[name]
    if any(known[part][0] != "fedtreelora" for part in parts):
        raise SystemExit(f"{name}: only fedtreelora variants combine with '+'")
    return "fedtreelora", [item for part in parts for item in known[part][1]]


def main() -> None:
    args = parser(__doc__, "runs/comparison", list(VARIANTS)).parse_args()
    table = run_table(args, {name: variant(name) for name in args.methods})
    pairs: list[tuple[str, str | list[str]]] = [
        ("fedtreelora", name) for name in args.methods if name != "fedtreelora" and name != CENTRALIZED
    ]
    print(write(args, table, PAPER, "fedtreelora_nlu", pairs))


if __name__ == "__main__":
    main()
