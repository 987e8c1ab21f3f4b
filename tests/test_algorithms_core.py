"""local, fedit and ffa on hand-made updates whose aggregates are written down."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options, registry
from fedlora.errors import FedLoraError
from fedlora.lora import ModuleId, init_factors
from helpers import make_ctx

Q = "layers.0.query.lora"
MID = ModuleId(0, "query")


def build(name: str, ctx, **options):  # type: ignore[no-untyped-def]
    cls = get_algorithm(name)
    return cls(ctx, parse_options(cls, options))


def test_registry_has_foundation_algorithms() -> None:
    assert {"local", "fedit", "ffa"} <= set(registry())


def test_fedit_weighted_mean_by_examples() -> None:
    # q = 1/4 and 3/4.
    ctx = make_ctx({0: 1, 1: 3})
    algo = build("fedit", ctx)
    updates = {
        0: Update({f"{Q}.A": torch.tensor([[1.0, 2.0, 3.0]]), f"{Q}.B": torch.tensor([[4.0], [0.0]])}, 1),
        1: Update({f"{Q}.A": torch.tensor([[5.0, 6.0, 7.0]]), f"{Q}.B": torch.tensor([[0.0], [8.0]])}, 3),
    }
    algo.aggregate(0, updates)
    payload = algo.configure(1, [0, 1])[0]
    assert_close(payload.tensors[f"{Q}.A"], torch.tensor([[4.0, 5.0, 6.0]]))
    assert_close(payload.tensors[f"{Q}.B"], torch.tensor([[1.0], [6.0]]))
    assert payload.upload == ("*",)


def test_fedit_uniform_weighting() -> None:
    algo = build("fedit", make_ctx({0: 1, 1: 3}), weighting="uniform")
    updates = {
        0: Update({f"{Q}.A": torch.tensor([[1.0, 2.0, 3.0]]), f"{Q}.B": torch.tensor([[4.0], [0.0]])}, 1),
        1: Update({f"{Q}.A": torch.tensor([[5.0, 6.0, 7.0]]), f"{Q}.B": torch.tensor([[0.0], [8.0]])}, 3),
    }
    algo.aggregate(0, updates)
    glob = algo.global_payload().tensors
    assert_close(glob[f"{Q}.A"], torch.tensor([[3.0, 4.0, 5.0]]))
    assert_close(glob[f"{Q}.B"], torch.tensor([[2.0], [4.0]]))


def test_fedit_partial_participation_normalises_over_participants() -> None:
    algo = build("fedit", make_ctx({0: 1, 1: 3, 2: 100}))
    updates = {
        0: Update({f"{Q}.A": torch.tensor([[1.0, 2.0, 3.0]]), f"{Q}.B": torch.tensor([[4.0], [0.0]])}, 1),
        1: Update({f"{Q}.A": torch.tensor([[5.0, 6.0, 7.0]]), f"{Q}.B": torch.tensor([[0.0], [8.0]])}, 3),
    }
    algo.aggregate(0, updates)
    assert_close(algo.global_payload().tensors[f"{Q}.A"], torch.tensor([[4.0, 5.0, 6.0]]))


def test_fedit_starts_from_seeded_init() -> None:
    ctx = make_ctx({0: 1, 1: 1}, seed=7)
    a, _ = init_factors(MID, "lora", 1, 3, 2, seed=7)
    payload = build("fedit", ctx).configure(0, [0])[0]
    assert_close(payload.tensors[f"{Q}.A"], a)
    assert torch.count_nonzero(payload.tensors[f"{Q}.B"]) == 0
    # Kaiming-uniform bound 1/sqrt(d_in).
    assert float(a.abs().max()) <= 1 / 3**0.5


def test_ffa_sends_and_averages_b_only() -> None:
    ctx = make_ctx({0: 1, 1: 3})
    algo = build("ffa", ctx)
    payload = algo.configure(0, [0, 1])[1]
    assert set(payload.tensors) == {f"{Q}.B"}
    assert payload.layout.trainable_keys() == [f"{Q}.B"]
    algo.aggregate(
        0,
        {
            0: Update({f"{Q}.B": torch.tensor([[4.0], [0.0]])}, 1),
            1: Update({f"{Q}.B": torch.tensor([[0.0], [8.0]])}, 3),
        },
    )
    assert_close(algo.global_payload().tensors[f"{Q}.B"], torch.tensor([[1.0], [6.0]]))


def test_ffa_average_of_products_is_exact() -> None:
    ctx = make_ctx({0: 1, 1: 3})
    a, _ = init_factors(MID, "lora", 1, 3, 2, seed=0)
    b0, b1 = torch.tensor([[4.0], [0.0]]), torch.tensor([[0.0], [8.0]])
    algo = build("ffa", ctx)
    algo.aggregate(0, {0: Update({f"{Q}.B": b0}, 1), 1: Update({f"{Q}.B": b1}, 3)})
    mean_b = algo.global_payload().tensors[f"{Q}.B"]
    assert_close(mean_b @ a, 0.25 * (b0 @ a) + 0.75 * (b1 @ a))


def test_local_never_communicates() -> None:
    algo = build("local", make_ctx({0: 1, 1: 3}))
    payloads = algo.configure(0, [0, 1])
    for p in payloads.values():
        assert p.tensors == {}
        assert p.upload == ()
        up, private = p.split({f"{Q}.A": torch.ones(1, 3)})
        assert up == {} and set(private) == {f"{Q}.A"}
    assert algo.global_payload() is None


def test_unknown_algorithm_and_option_are_clear_errors() -> None:
    with pytest.raises(FedLoraError, match=r"unknown algorithm 'fedavgg'.*fedit"):
        get_algorithm("fedavgg")
    with pytest.raises(FedLoraError, match=r"no option wieghting.*weighting"):
        parse_options(get_algorithm("fedit"), {"wieghting": "uniform"})
    with pytest.raises(FedLoraError, match="'examples' or 'uniform'"):
        parse_options(get_algorithm("fedit"), {"weighting": "median"})


def test_homogeneous_methods_reject_mixed_ranks() -> None:
    with pytest.raises(FedLoraError, match="one rank"):
        build("fedit", make_ctx({0: 1, 1: 1}, ranks={0: 2, 1: 4}))


def test_fedex_configure_reads_server_state_without_changing_it() -> None:
    """A retried round configures again and is charged the same bytes: before this fix the first
    configure marked the dense base as delivered, so the retry was counted without it."""
    algo = build("fedex", make_ctx({0: 1, 1: 1}, rank=1))
    lora = {k: v for k, v in algo.configure(0, [0])[0].tensors.items() if not k.endswith(".dW")}
    factor_bytes = sum(v.numel() * 4 for v in lora.values())
    dense_bytes = 2 * 3 * 4  # one module, d_out 2 x d_in 3
    assert {c: p.wire_bytes for c, p in algo.configure(0, [0, 1]).items()} == {0: factor_bytes, 1: factor_bytes}
    algo.aggregate(0, {c: Update({k: v + c + 1 for k, v in lora.items()}, 1) for c in (0, 1)})
    first = {c: p.wire_bytes for c, p in algo.configure(1, [0, 1]).items()}
    again = {c: p.wire_bytes for c, p in algo.configure(1, [0, 1]).items()}
    assert first == again == {0: factor_bytes + dense_bytes, 1: factor_bytes + dense_bytes}


def test_a_renamed_option_names_its_new_key() -> None:
    with pytest.raises(FedLoraError, match=r"algorithm\.warmup is now called algorithm\.warmup_rounds"):
        parse_options(get_algorithm("fedlease"), {"warmup": 2})
    assert parse_options(get_algorithm("fedlease"), {"warmup_rounds": 2}).warmup_rounds == 2  # type: ignore[attr-defined]
