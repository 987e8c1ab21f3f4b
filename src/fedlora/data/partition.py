"""Splitting a data set across federated clients, and each client's share into train/test.

Partitions are computed with the partitioners of ``flwr-datasets`` on a minimal in-memory
:class:`datasets.Dataset` that holds only an ``idx`` column (the example's position in the
:class:`~fedlora.data.catalog.TextDataset`) and the column the partitioner needs. Results are
deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.data.catalog import TextDataset
from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

__all__ = ["PARTITIONERS", "ClientSplit", "natural_groups", "partition", "split_clients"]

PARTITIONERS: dict[str, str] = {
    "iid": "shuffle (seeded), then equal contiguous shards: client sizes differ by at most 1",
    "dirichlet": (
        "label skew: each class is split across clients by Dirichlet(alpha) proportions; smaller alpha = more "
        "skew; every client gets at least min_size examples"
    ),
    "pathological": (
        "each client holds exactly classes_per_client classes (its first class is client_id mod #classes, the "
        "others drawn with the seed); a class's examples are split evenly among the clients that hold it"
    ),
    "natural": (
        "one client per distinct value of a column (by=, default 'client'); with more distinct values than "
        "clients, the num_clients largest groups are kept (ties: smaller value first) and the rest is left out"
    ),
}
"""Partitioning methods: name -> one-line description (for ``fedlora list``)."""


def _check_int(name: str, value: object, minimum: int) -> int:
    """Check that ``value`` is an integer of at least ``minimum``.

    Parameters
    ----------
    name : str
        Parameter name (for the message).
    value : object
        The value.
    minimum : int
        Smallest allowed value.

    Returns
    -------
    int
        The value as a Python int.

    Raises
    ------
    FedLoraError
        If it is not an integer or is too small.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FedLoraError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FedLoraError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _run_partitioner(partitioner: Partitioner, columns: dict[str, Any], num_clients: int) -> list[np.ndarray]:
    """Attach a minimal data set to a flwr-datasets partitioner and read every partition.

    Parameters
    ----------
    partitioner : flwr_datasets.partitioner.Partitioner
        A fresh partitioner.
    columns : dict
        Columns of the minimal data set; must include ``"idx"`` (positions in the TextDataset).
    num_clients : int
        Number of partitions to read.

    Returns
    -------
    list of numpy.ndarray
        Sorted ``int64`` positions per client.
    """
    import datasets

    # Arrow format: a column (the partitioner's labels, our "idx") is then a pyarrow array that
    # numpy copies at once, not a lazy Column that numpy iterates row by row (seconds for 10,000 rows).
    partitioner.dataset = datasets.Dataset.from_dict(columns).with_format("arrow")

    def read(client: int) -> np.ndarray:
        return np.sort(np.asarray(partitioner.load_partition(client)["idx"], dtype=np.int64))

    # flwr-datasets warns while it retries and the natural partitioner draws a tqdm bar on
    # stderr; failures come back as ValueError, which the callers translate.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        first = read(0)  # draws the whole assignment
        mapping = _row_mapping(partitioner, num_clients)
        if mapping is None:
            return [first, *(read(client) for client in range(1, num_clients))]
    # One array lookup per client instead of one datasets.select (10 ms each: minutes at 10,000).
    idx = np.asarray(columns["idx"], dtype=np.int64)
    return [np.sort(idx[np.asarray(mapping[c], dtype=np.int64)]) for c in range(num_clients)]


def _row_mapping(partitioner: Partitioner, num_clients: int) -> Mapping[int, Any] | None:
    """The partition -> row positions assignment of a partitioner that has drawn it, else None.

    ``load_partition(c)`` of flwr-datasets 0.6's Dirichlet, Pathological and NaturalId
    partitioners is ``dataset.select(mapping[c])``. The mapping is private API, so anything
    unexpected falls back to reading the partitions one by one (equality with that path
    is tested).
    """
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(mapping, Mapping) or any(c not in mapping for c in range(num_clients)):
        return None
    return mapping


def natural_groups(ds: TextDataset, *, num_clients: int, by: str = "client") -> list[str]:
    """Return the group values that the ``natural`` partitioner makes into clients, in client order.

    With exactly ``num_clients`` distinct values of ``ds.columns[by]``, every value is a
    client. With more, the ``num_clients`` largest groups are kept (ties broken by the
    smaller value in string order) and the examples of the other groups are left out.
    Clients are ordered by their value in string order.

    Parameters
    ----------
    ds : TextDataset
        The data set.
    num_clients : int
        Number of clients wanted.
    by : str, optional
        Name of the column in ``ds.columns`` to group by.

    Returns
    -------
    list of str
        ``num_clients`` group values; client ``i`` holds the examples whose value is the ``i``-th.

    Raises
    ------
    FedLoraError
        If the column does not exist or has fewer distinct values than ``num_clients``.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    if by not in ds.columns:
        available = ", ".join(repr(c) for c in sorted(ds.columns)) or "none"
        raise FedLoraError(
            f"natural partitioning by {by!r}: data set {ds.name!r} has no such column (columns available: "
            f"{available}); pick one of those with by=..., or add a 'client' column to your data file"
        )
    counts = Counter(ds.columns[by])
    if num_clients > len(counts):
        raise FedLoraError(
            f"natural partitioning by {by!r}: data set {ds.name!r} has only {len(counts)} distinct values, "
            f"so it cannot make {num_clients} clients; set num_clients to at most {len(counts)}"
        )
    largest = sorted(counts, key=lambda value: (-counts[value], value))[:num_clients]
    return sorted(largest)


def partition(
    ds: TextDataset,
    *,
    method: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
    classes_per_client: int = 2,
    by: str = "client",
) -> list[np.ndarray]:
    """Split a data set across ``num_clients`` federated clients.

    Parameters
    ----------
    ds : TextDataset
        The data set.
    method : str
        One of :data:`PARTITIONERS`:

        - ``"iid"``: the positions are shuffled with ``seed``, then cut into equal
          contiguous shards exactly as ``IidPartitioner`` cuts them (sizes differ by at most 1).
        - ``"dirichlet"``: ``DirichletPartitioner(partition_by="label", alpha=alpha,
          min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed)``.
        - ``"pathological"``: ``PathologicalPartitioner(num_classes_per_partition=classes_per_client,
          class_assignment_mode="first-deterministic", seed=seed)``: client ``i`` gets class
          ``i mod #classes`` plus classes drawn with the seed. When there are fewer clients than
          classes, the classes no client gets are left out.
        - ``"natural"``: ``NaturalIdPartitioner`` on the column ``ds.columns[by]``; see
          :func:`natural_groups` for which groups become clients (and in which order) when
          there are more distinct values than ``num_clients``.
    num_clients : int
        Number of clients (at least 1, at most the number of examples).
    seed : int
        Non-negative seed; the same seed gives the same partition.
    alpha : float, optional
        Dirichlet concentration (``dirichlet`` only), greater than 0.
    min_size : int, optional
        Smallest number of examples per client (``dirichlet`` only), at least 0.
    classes_per_client : int, optional
        Classes per client (``pathological`` only), 1 .. number of classes present.
    by : str, optional
        Column of ``ds.columns`` to group by (``natural`` only).

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` array of positions into ``ds`` per client; the arrays are disjoint.

    Raises
    ------
    FedLoraError
        For an unknown method, bad parameters, more clients than examples, or a Dirichlet
        partition that cannot give every client ``min_size`` examples.
    """
    if method not in PARTITIONERS:
        raise FedLoraError(f"unknown partition method {method!r}; use one of: {', '.join(PARTITIONERS)}")
    num_clients = _check_int("num_clients", num_clients, 1)
    seed = _check_int("seed", seed, 0)
    n = len(ds)
    if method != "natural" and num_clients > n:
        raise FedLoraError(
            f"cannot split {n} examples of {ds.name!r} across {num_clients} clients; "
            f"use at most {n} clients or a bigger data set"
        )

    from flwr_datasets import partitioner as fp

    idx = np.arange(n, dtype=np.int64)
    if method == "iid":
        # IidPartitioner's contiguous shards (datasets' ``shard(contiguous=True)``) are
        # ``np.array_split``'s: cut here directly, as reading 10,000 partitions back one by
        # one from a datasets.Dataset takes minutes (equality with flwr-datasets is tested).
        perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
        return [np.sort(shard) for shard in np.array_split(perm, num_clients)]

    if method == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
            raise FedLoraError(f"alpha must be a number, got {alpha!r}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise FedLoraError(
                f"alpha must be a finite number greater than 0, got {alpha}; 0.1 = strong skew, 100 ~ iid"
            )
        min_size = _check_int("min_size", min_size, 0)
        if min_size * num_clients > n:
            raise FedLoraError(
                f"dirichlet partition: {num_clients} clients x min_size {min_size} = {min_size * num_clients} "
                f"examples needed but {ds.name!r} has {n}; lower min_size or use fewer clients"
            )
        dirichlet = fp.DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        try:
            return _run_partitioner(dirichlet, {"idx": idx, "label": ds.labels}, num_clients)
        except ValueError as exc:
            raise FedLoraError(
                f"dirichlet partition with alpha={alpha} could not give each of {num_clients} clients at least "
                f"min_size={min_size} examples of {ds.name!r} in 10 draws; lower min_size, raise alpha "
                "(less skew) or use fewer clients"
            ) from exc

    if method == "pathological":
        present = int(np.unique(ds.labels).size)
        classes_per_client = _check_int("classes_per_client", classes_per_client, 1)
        if classes_per_client > present:
            raise FedLoraError(
                f"pathological partition: classes_per_client={classes_per_client} but {ds.name!r} has only "
                f"{present} classes; use classes_per_client between 1 and {present}"
            )
        pathological = fp.PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
        try:
            return _run_partitioner(pathological, {"idx": idx, "label": ds.labels}, num_clients)
        except ValueError as exc:
            raise FedLoraError(
                f"pathological partition of {ds.name!r} into {num_clients} clients with {classes_per_client} "
                f"classes each is impossible: a class has fewer examples than clients that need it ({exc}); "
                "use fewer clients or fewer classes_per_client"
            ) from exc

    groups = natural_groups(ds, num_clients=num_clients, by=by)
    code_of = {value: code for code, value in enumerate(groups)}
    codes = np.fromiter((code_of.get(v, -1) for v in ds.columns[by]), dtype=np.int64, count=n)
    kept = np.flatnonzero(codes >= 0)
    return _run_partitioner(
        fp.NaturalIdPartitioner(partition_by="group"), {"idx": kept, "group": codes[kept]}, num_clients
    )


@dataclass
class ClientSplit:
    """One client's examples, split into train and test.

    Attributes
    ----------
    train : numpy.ndarray
        Sorted ``int64`` positions into the data set used for training.
    test : numpy.ndarray
        Sorted ``int64`` positions into the data set held out for evaluation.
    """

    train: np.ndarray
    test: np.ndarray


def split_clients(
    parts: list[np.ndarray],
    *,
    test_fraction: float,
    seed: int,
    max_train: int | None = None,
    max_test: int | None = None,
) -> list[ClientSplit]:
    """Split every client's examples into train and test.

    For client ``i`` with ``n`` examples, the examples are shuffled with a generator seeded
    by ``(seed, i)`` (so a client's split does not depend on the other clients), then
    ``test`` is the first ``n_test`` and ``train`` the rest, where ``n_test`` is
    ``test_fraction * n`` rounded half up, raised to 1 when ``test_fraction > 0`` and
    ``n >= 2``, and lowered to ``n - 1`` so that a non-empty client keeps a training example.
    The caps then keep the first ``max_train`` / ``max_test`` of the shuffled train / test
    (a random subset). Returned arrays are sorted.

    Parameters
    ----------
    parts : list of numpy.ndarray
        Positions per client (from :func:`partition`).
    test_fraction : float
        Fraction held out for test, in ``[0, 1)``.
    seed : int
        Non-negative seed.
    max_train : int, optional
        Keep at most this many training examples per client (at least 1).
    max_test : int, optional
        Keep at most this many test examples per client (at least 0).

    Returns
    -------
    list of ClientSplit
        One split per client, in the order of ``parts``.

    Raises
    ------
    FedLoraError
        If ``test_fraction`` is outside ``[0, 1)`` or a seed or cap is invalid.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating)):
        raise FedLoraError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise FedLoraError(f"test_fraction must be in [0, 1) (for example 0.2), got {test_fraction}")
    seed = _check_int("seed", seed, 0)
    if max_train is not None:
        max_train = _check_int("max_train", max_train, 1)
    if max_test is not None:
        max_test = _check_int("max_test", max_test, 0)
    splits: list[ClientSplit] = []
    for client, part in enumerate(parts):
        indices = np.asarray(part, dtype=np.int64).ravel()
        n = indices.size
        shuffled = indices[np.random.default_rng([seed, client]).permutation(n)]
        n_test = math.floor(test_fraction * n + 0.5)
        if test_fraction > 0 and n >= 2:
            n_test = max(n_test, 1)
        n_test = min(n_test, max(n - 1, 0))
        test, train = shuffled[:n_test], shuffled[n_test:]
        if max_train is not None:
            train = train[:max_train]
        if max_test is not None:
            test = test[:max_test]
        splits.append(ClientSplit(train=np.sort(train), test=np.sort(test)))
    return splits
