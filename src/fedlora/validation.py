"""Server-side checks of client updates, for every algorithm, before aggregation.

What a client must upload follows from the :class:`~fedlora.algorithms.base.Payload` it
was sent: the trainable keys of its layout that match the payload's upload patterns, with
shapes given by the layout's ranks and the model's module shapes (plus the head under the
``federated`` head policy). :func:`update_problem` rejects an update with missing or extra
keys, wrong shapes (a rank other than the client's) or non-finite values; a rejected
update is recorded and never aggregated. :func:`clip_to_median` bounds each update's norm
at a multiple of the round's median norm (``federation.clip_update_norm``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import numpy as np
import torch

from fedlora.algorithms.base import Payload, Tensors
from fedlora.lora import Layout, ModuleId, make_key, parse_key

__all__ = ["clip_to_median", "expected_upload", "layout_shapes", "non_finite_keys", "update_problem"]

Shape = tuple[int, ...]


def layout_shapes(layout: Layout, module_shapes: Mapping[ModuleId, tuple[int, int]]) -> dict[str, Shape]:
    """Shape of every trainable tensor of ``layout`` (``A``: rank x d_in, ``B``: d_out x rank, ...)."""
    shapes: dict[str, Shape] = {}
    for mid, ml in layout.modules.items():
        d_out, d_in = module_shapes[mid]
        for s in ml.slots:
            shapes[make_key(mid, s.name, "A")] = (s.rank, d_in)
            shapes[make_key(mid, s.name, "B")] = (d_out, s.rank)
        for (slot, factor), shape in ml.mixing_shapes(d_in).items():
            shapes[make_key(mid, slot, factor)] = shape
    return {key: shapes[key] for key in layout.trainable_keys()}


def expected_upload(
    payload: Payload, module_shapes: Mapping[ModuleId, tuple[int, int]], head_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """Keys and shapes a client sent ``payload`` must upload.

    ``head_shapes`` are the head tensors it uploads as well (empty unless the head is
    federated); like the head policy, a payload that uploads nothing uploads no head.
    """
    trained = layout_shapes(payload.layout, module_shapes)
    expected = {k: s for k, s in trained.items() if any(fnmatch.fnmatchcase(k, p) for p in payload.upload)}
    if payload.upload:
        expected.update(head_shapes)
    return expected


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _rank_hint(key: str, got: Shape, expected: Shape) -> str:
    if not key.startswith("layers.") or len(got) != 2 or len(expected) != 2:
        return ""
    factor = parse_key(key).factor
    axis = {"A": 0, "B": 1}.get(factor)
    if axis is None or got[axis] == expected[axis]:
        return ""
    return f" (rank {got[axis]}, but the client's rank is {expected[axis]})"


def update_problem(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Shape]) -> str | None:
    """Why an update must be rejected, or ``None`` if it is well-formed.

    Parameters
    ----------
    tensors
        The uploaded tensors.
    expected
        Key -> shape the client should have uploaded (see :func:`expected_upload`).
    """
    missing = sorted(set(expected) - set(tensors))
    if missing:
        return f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    extra = sorted(set(tensors) - set(expected))
    if extra:
        return f"unexpected keys {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            return f"{key} has shape {got}, expected {tuple(shape)}{_rank_hint(key, got, tuple(shape))}"
    bad = non_finite_keys(tensors)
    if bad:
        return f"non-finite values (NaN or Inf) in {bad[:3]}{' ...' if len(bad) > 3 else ''}"
    return None


def _delta_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    squares = sum(float(((tensors[k].double() - reference[k].double()) ** 2).sum()) for k in tensors)
    return float(np.sqrt(squares))


def clip_to_median(
    updates: Mapping[int, Tensors], references: Mapping[int, Mapping[str, torch.Tensor]], factor: float
) -> tuple[dict[int, Tensors], dict[int, float]]:
    """Bound every update's change at ``factor`` times the round's median change.

    A client's change is the L2 norm, over all its uploaded tensors together, of
    ``update - reference`` (the reference is what the client started the round from).
    A change larger than ``factor * median`` is scaled down to that bound:
    ``reference + (update - reference) * bound / norm``.

    Returns
    -------
    tuple
        The updates (clipped ones replaced) and, for each clipped client, the scale applied.
    """
    norms = {c: _delta_norm(t, references[c]) for c, t in updates.items()}
    if not norms:
        return dict(updates), {}
    bound = factor * float(np.median(list(norms.values())))
    out = dict(updates)
    scales: dict[int, float] = {}
    for client, norm in norms.items():
        if norm > bound:
            scale = bound / norm
            ref = references[client]
            out[client] = {k: ref[k] + (v - ref[k]) * scale for k, v in updates[client].items()}
            scales[client] = scale
    return out, scales
