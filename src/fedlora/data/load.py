"""One entry point for every data set: a catalog name, an instruction mix, or a user file.

Kept apart from :mod:`fedlora.data.catalog` so that the catalog, the file readers
(:mod:`fedlora.data.files`) and the instruction sets (:mod:`fedlora.data.instruct`) import
one another in one direction only: catalog <- instruct <- files <- load.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.data.catalog import BUILTIN_LOADERS, DATASET_CATALOG, TextDataset
from fedlora.data.files import read_csv, read_jsonl
from fedlora.data.instruct import INSTRUCT_MIX, load_instruct_mix
from fedlora.errors import FedLoraError

__all__ = ["load_dataset"]


def _unknown_spec(spec: str) -> FedLoraError:
    names = ", ".join(sorted(DATASET_CATALOG))
    hint = ""
    lowered = spec.lower()
    if lowered.endswith(".csv"):
        hint = f" (for a CSV file write 'csv:{spec}')"
    elif lowered.endswith((".jsonl", ".json", ".ndjson")):
        hint = f" (for a JSON Lines file write 'jsonl:{spec}')"
    return FedLoraError(
        f"unknown data set {spec!r}{hint}; use one of: {names}, "
        "or a file of your own as 'csv:<path>' or 'jsonl:<path>' (columns text, label, optional client)"
    )


def load_dataset(spec: str) -> TextDataset:
    """Load a data set by catalog name or from a user file.

    Parameters
    ----------
    spec : str
        A name in :data:`DATASET_CATALOG` (``"rotten_tomatoes"``, ``"bbc_news"``, ``"instruct_mix"``;
        ``"instruct_mix:<group>,<group>"`` keeps some task groups, see :mod:`fedlora.data.instruct`), or
        ``"csv:<path>"`` / ``"jsonl:<path>"`` for a local file with a ``text`` and a
        ``label`` column and optionally a ``client`` column (see
        :func:`fedlora.data.files.read_csv` and :func:`fedlora.data.files.read_jsonl`).

    Returns
    -------
    TextDataset
        The loaded data set.

    Raises
    ------
    FedLoraError
        For an unknown spec, a missing package or file, or a malformed user file.
    """
    spec = spec.strip()
    if spec in BUILTIN_LOADERS:
        return BUILTIN_LOADERS[spec]()
    if spec == INSTRUCT_MIX:
        return load_instruct_mix()
    if spec.startswith(INSTRUCT_MIX + ":"):
        groups = [g.strip() for g in spec.split(":", 1)[1].split(",") if g.strip()]
        return load_instruct_mix(groups)
    kind, sep, path = spec.partition(":")
    if sep and kind.lower() in ("csv", "jsonl"):
        if not path.strip():
            raise FedLoraError(f"data set spec {spec!r} has no path; write '{kind.lower()}:<path to your file>'")
        reader = read_csv if kind.lower() == "csv" else read_jsonl
        return reader(Path(path.strip()).expanduser(), name=spec)
    raise _unknown_spec(spec)
