"""The heterogeneous-rank family on hand-made tensors: zeropad, hetlora, flexlora, flora, fedhl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options, registry
from fedlora.algorithms.fedhl import fedhl_weights
from fedlora.algorithms.lowrank import delta_key, stacked_product, top_svd
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.lora import ModuleId, init_factors
from fedlora.simulation import resolve_ranks
from helpers import make_ctx, run_rows

ROOT = Path(__file__).parent.parent
MID = ModuleId(0, "query")
L = "layers.0.query.lora"
DW = "layers.0.query.base.dW"


def build(name: str, ctx, **options):  # type: ignore[no-untyped-def]
    cls = get_algorithm(name)
    return cls(ctx, parse_options(cls, options))


def lora(a: list[list[float]], b: list[list[float]], n: int = 1) -> Update:
    return Update({f"{L}.A": torch.tensor(a), f"{L}.B": torch.tensor(b)}, n)


# --- ranks per client -------------------------------------------------------------------
def test_resolve_ranks_list_round_robin_and_seeded_random() -> None:
    smoke = ROOT / "configs" / "smoke.toml"
    clients = [0, 1, 2, 3]
    listed = load_config(smoke, ["model.ranks=[8, 2, 4, 2]", "model.rank_assignment='list'"])
    assert resolve_ranks(listed, clients) == {0: 8, 1: 2, 2: 4, 3: 2}
    robin = load_config(smoke, ["model.ranks=[2, 4, 8]"])
    assert resolve_ranks(robin, clients) == {0: 2, 1: 4, 2: 8, 3: 2}
    assert resolve_ranks(load_config(smoke), clients) == {0: 4, 1: 4, 2: 4, 3: 4}
    many = list(range(40))
    random = load_config(smoke, ["model.ranks=[2, 16]", "model.rank_assignment='random'"])
    drawn = resolve_ranks(random, many)
    assert drawn == resolve_ranks(random, many)
    assert set(drawn.values()) == {2, 16}
    other_seed = load_config(smoke, ["model.ranks=[2, 16]", "model.rank_assignment='random'", "run.seed=1"])
    assert resolve_ranks(other_seed, many) != drawn


# --- zeropad and hetlora ----------------------------------------------------------------
def three_clients_ranks_2_4_8() -> dict[int, Update]:
    # One 1x1 module; every component of a client has the same value.
    return {
        0: lora([[1.0]] * 2, [[1.0] * 2], n=1),
        1: lora([[2.0]] * 4, [[1.0] * 4], n=1),
        2: lora([[4.0]] * 8, [[0.5] * 8], n=2),
    }


MIXED_RANK_METHODS = {"local", "zeropad", "hetlora", "flexlora", "flora", "fedhl"}
ONE_RANK_METHODS = {
    *("fedit", "ffa", "fedex", "fedsa", "feddpa", "fedalt", "fedlease", "sharedepth", "fedtreelora"),
    *("fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"),
}


def test_every_shipped_algorithm_says_whether_it_takes_mixed_ranks() -> None:
    # the package's own algorithms (a test double may be registered while its own test runs)
    shipped = {name: cls for name, cls in registry().items() if cls.__module__.startswith("fedlora.algorithms.")}
    assert {name for name, cls in shipped.items() if cls.mixed_ranks} == MIXED_RANK_METHODS
    assert {name for name, cls in shipped.items() if not cls.mixed_ranks} == ONE_RANK_METHODS


@pytest.mark.parametrize("name", sorted(MIXED_RANK_METHODS | ONE_RANK_METHODS))
def test_only_the_heterogeneous_rank_family_accepts_mixed_ranks(name: str) -> None:
    ctx = make_ctx({0: 10, 1: 10, 2: 10}, shapes={MID: (8, 8)}, rank=4, ranks={0: 2, 1: 4, 2: 4})
    if name in ONE_RANK_METHODS:
        with pytest.raises(FedLoraError, match=f"{name} needs one rank for all clients"):
            build(name, ctx)
    else:
        build(name, ctx)
    build(name, make_ctx({0: 10, 1: 10, 2: 10}, shapes={MID: (8, 8)}, rank=4))


def test_zeropad_padded_weighted_mean_by_hand() -> None:
    ctx = make_ctx({0: 1, 1: 1, 2: 2}, shapes={MID: (1, 1)}, alpha=8.0, ranks={0: 2, 1: 4, 2: 8})
    algo = build("zeropad", ctx)
    algo.aggregate(0, three_clients_ranks_2_4_8())
    glob = algo.global_payload().tensors
    # q = 1/4, 1/4, 1/2; padded zeros count. A rows 0-1: .25*1 + .25*2 + .5*4 = 2.75;
    # rows 2-3: .25*2 + .5*4 = 2.5; rows 4-7: .5*4 = 2. B at the global scaling (times
    # r_max / r_k = 4, 2, 1): 4, 2, .5 -> cols 0-1: 1 + .5 + .25 = 1.75; 2-3: .75; 4-7: .25.
    assert_close(glob[f"{L}.A"], torch.tensor([[2.75]] * 2 + [[2.5]] * 2 + [[2.0]] * 4))
    assert_close(glob[f"{L}.B"], torch.tensor([[1.75] * 2 + [0.75] * 2 + [0.25] * 4]))
    payloads = algo.configure(1, [0, 1])
    assert_close(payloads[0].tensors[f"{L}.A"], torch.tensor([[2.75]] * 2))
    # back to the client's scaling: times r_k / r_max = 1/2 for the rank-4 client
    assert_close(payloads[1].tensors[f"{L}.B"], torch.tensor([[0.875, 0.875, 0.375, 0.375]]))
    assert payloads[0].layout.modules[MID].slots[0].rank == 2


def effective(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * b.double() @ a.double()


@pytest.mark.parametrize("name", ["zeropad", "hetlora"])
def test_zeropad_and_hetlora_clients_start_from_the_global_truncation_at_the_global_scaling(name: str) -> None:
    ranks = {0: 2, 1: 4, 2: 16}
    alpha = 8.0
    ctx = make_ctx({0: 3, 1: 5, 2: 7}, shapes={MID: (6, 5)}, alpha=alpha, ranks=ranks)
    algo = build(name, ctx)
    gen = torch.Generator().manual_seed(0)
    uploads = {
        c: Update({f"{L}.A": torch.randn(r, 5, generator=gen), f"{L}.B": torch.randn(6, r, generator=gen)}, 3 + 2 * c)
        for c, r in ranks.items()
    }
    algo.aggregate(0, uploads)
    glob = algo.global_payload().tensors
    assert algo.global_payload().layout.modules[MID].slots[0].scaling == pytest.approx(alpha / 16)
    payloads = algo.configure(1, sorted(ranks))
    for c, r in ranks.items():
        sent = payloads[c].tensors
        assert payloads[c].layout.modules[MID].slots[0].scaling == pytest.approx(alpha / r)
        # the client's effective update = the global one restricted to its first r components
        assert_close(
            effective(sent[f"{L}.A"], sent[f"{L}.B"], alpha / r),
            effective(glob[f"{L}.A"][:r], glob[f"{L}.B"][:, :r], alpha / 16),
        )
    # the reverse direction: an upload enters the average as the client's own update.
    # One participant with all the weight -> the global model's effective update is its own.
    for c, r in ranks.items():
        algo.aggregate(2, {c: uploads[c]})
        glob = algo.global_payload().tensors
        own = effective(uploads[c].tensors[f"{L}.A"], uploads[c].tensors[f"{L}.B"], alpha / r)
        assert_close(effective(glob[f"{L}.A"], glob[f"{L}.B"], alpha / 16), own)


def test_zeropad_starts_from_nested_seeded_init() -> None:
    ctx = make_ctx({0: 1, 1: 1}, shapes={MID: (2, 3)}, ranks={0: 1, 1: 3})
    payloads = build("zeropad", ctx).configure(0, [0, 1])
    a3, _ = init_factors(MID, "lora", 3, 3, 2, ctx.seed)
    assert_close(payloads[1].tensors[f"{L}.A"], a3)
    assert_close(payloads[0].tensors[f"{L}.A"], a3[:1])


def test_hetlora_norm_weights_by_hand() -> None:
    ctx = make_ctx({0: 1, 1: 1, 2: 2}, shapes={MID: (1, 1)}, alpha=8.0, ranks={0: 2, 1: 4, 2: 8})
    algo = build("hetlora", ctx)
    # ||s B A||: s = 8/2, 8/4, 8/8 -> 4 * 2 = 8, 2 * 8 = 16, 1 * 16 = 16 -> p = .2, .4, .4 (data sizes ignored).
    algo.aggregate(0, three_clients_ranks_2_4_8())
    glob = algo.global_payload().tensors
    assert_close(glob[f"{L}.A"], torch.tensor([[2.6]] * 2 + [[2.4]] * 2 + [[1.6]] * 4))
    # B at the global scaling (times r_max / r_k): 4, 2, .5 -> .8 + .8 + .2, .8 + .2, .2
    assert_close(glob[f"{L}.B"], torch.tensor([[1.8] * 2 + [1.0] * 2 + [0.2] * 4]))
    assert algo.structure()["weights"]["0"] == pytest.approx({"0": 0.2, "1": 0.4, "2": 0.4})


def test_hetlora_self_pruning_drops_a_client_whose_tail_is_small() -> None:
    ctx = make_ctx({0: 1, 1: 1}, shapes={MID: (1, 1)}, alpha=4.0, ranks={0: 4, 1: 4})
    algo = build("hetlora", ctx, prune_decay=0.5, prune_threshold=0.1)
    # Client 0: tail (components 2, 3) carries 0.01 of the norm; client 1: half of it.
    algo.aggregate(0, {0: lora([[1.0], [1.0], [0.01], [0.01]], [[1.0] * 4]), 1: lora([[1.0]] * 4, [[1.0] * 4])})
    payloads = algo.configure(1, [0, 1])
    assert payloads[0].tensors[f"{L}.A"].shape == (2, 1)
    assert payloads[1].tensors[f"{L}.A"].shape == (4, 1)
    assert algo.structure()["pruned_ranks"] == {"0": 2, "1": 4}
    with pytest.raises(FedLoraError, match="prune_decay"):
        build("hetlora", ctx, prune_decay=0.0)


# --- flexlora and fedhl: dense basis, truncations -----------------------------------------
def diag_delta() -> torch.Tensor:
    """A 4x3 update with singular values 3, 2, 1 (rank 3, non-square)."""
    return torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def echo(payloads):  # type: ignore[no-untyped-def]
    """Every client returns exactly what it received (with data sizes 1, 1, 2)."""
    return {c: Update(dict(p.tensors), 2 if c == 2 else 1) for c, p in payloads.items()}


def test_fedhl_echo_round_leaves_the_update_unchanged() -> None:
    ctx = make_ctx({0: 1, 1: 1, 2: 2}, shapes={MID: (4, 3)}, alpha=2.0, ranks={0: 1, 1: 2, 2: 3})
    algo = build("fedhl", ctx)
    algo.delta[MID] = diag_delta()
    for rnd in range(3):
        algo.aggregate(rnd, echo(algo.configure(rnd, [0, 1, 2])))
        assert_close(algo.delta[MID], diag_delta(), atol=1e-6, rtol=0)
    # Also with a dense random update and partial participation.
    algo.delta[MID] = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    before = algo.delta[MID].clone()
    algo.aggregate(3, echo(algo.configure(3, [0, 2])))
    assert_close(algo.delta[MID], before, atol=1e-6, rtol=0)


def test_flexlora_echo_round_shrinks_to_the_mean_of_truncations() -> None:
    ctx = make_ctx({0: 1, 1: 1, 2: 2}, shapes={MID: (4, 3)}, alpha=2.0, ranks={0: 1, 1: 2, 2: 3})
    algo = build("flexlora", ctx)
    algo.delta[MID] = diag_delta()
    algo.aggregate(0, echo(algo.configure(0, [0, 1, 2])))
    # q = 1/4, 1/4, 1/2: diag(3,0,0)/4 + diag(3,2,0)/4 + diag(3,2,1)/2 = diag(3, 1.5, 0.5).
    expected = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    assert_close(algo.delta[MID], expected, atol=1e-6, rtol=0)


def test_truncation_payload_factors_and_zero_singular_value_fallback() -> None:
    ctx = make_ctx({0: 1, 1: 1}, shapes={MID: (4, 3)}, alpha=2.0, ranks={0: 1, 1: 3})
    algo = build("fedhl", ctx)
    # Round 0 (dW = 0): the standard init, A seeded, B zero.
    payload = algo.configure(0, [1])[1]
    a_init, _ = init_factors(MID, "lora", 3, 3, 4, ctx.seed)
    assert_close(payload.tensors[f"{L}.A"], a_init)
    assert_close(payload.tensors[f"{L}.B"], torch.zeros(4, 3))
    # dW of rank 2: the rank-3 client gets both components (s = 2/3) and the init for the third.
    algo.delta[MID] = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = algo.configure(1, [0, 1])
    s1, s3 = 2.0 / 1, 2.0 / 3
    rank1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(s1 * t[0].tensors[f"{L}.B"] @ t[0].tensors[f"{L}.A"], rank1, atol=1e-6, rtol=0)
    assert_close(s3 * t[1].tensors[f"{L}.B"] @ t[1].tensors[f"{L}.A"], algo.delta[MID], atol=1e-6, rtol=0)
    assert_close(t[1].tensors[f"{L}.A"][2], a_init[2])
    assert_close(t[1].tensors[f"{L}.B"][:, 2], torch.zeros(4))


def test_fedhl_homogeneous_full_participation_is_the_exact_mean_of_products() -> None:
    ctx = make_ctx({0: 1, 1: 1, 2: 1}, shapes={MID: (4, 3)}, alpha=2.0, ranks={0: 2, 1: 2, 2: 2})
    algo = build("fedhl", ctx)
    gen = torch.Generator().manual_seed(1)
    for rnd in range(3):
        payloads = algo.configure(rnd, [0, 1, 2])
        if rnd > 0:  # dW has rank <= 2, so every client starts from dW itself
            start = payloads[0].tensors[f"{L}.B"] @ payloads[0].tensors[f"{L}.A"]
            assert_close(start, algo.delta[MID], atol=1e-5, rtol=0)
        updates = {
            c: lora(torch.randn(2, 3, generator=gen).tolist(), torch.randn(4, 2, generator=gen).tolist())
            for c in payloads
        }
        weights = fedhl_weights(algo.truncation_errors(rnd, [0, 1, 2]), "optimal")
        assert weights == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})  # equal ranks: equal errors
        mean = sum(u.tensors[f"{L}.B"] @ u.tensors[f"{L}.A"] for u in updates.values()) / 3
        algo.aggregate(rnd, updates)
        # Uploads of rank 2 each: the mean has rank <= 6, keep dW at rank 2 for the next round's check.
        assert_close(algo.delta[MID], mean, atol=1e-5, rtol=0)
        u, s, vh = torch.linalg.svd(algo.delta[MID], full_matrices=False)
        algo.delta[MID] = (u[:, :2] * s[:2]) @ vh[:2]


def test_fedhl_weights_by_hand() -> None:
    errors = {0: 1.0, 1: 2.0, 2: 3.0}  # e^2 = 1, 4, 9; scale-aware eps = mean = 14/3
    # 1 / (e^2 + 14/3) = 3/17, 3/26, 3/41.
    total = 1 / 17 + 1 / 26 + 1 / 41
    assert fedhl_weights(errors, "optimal") == pytest.approx({0: 1 / 17 / total, 1: 1 / 26 / total, 2: 1 / 41 / total})
    # eps = 1e-6: ~ 1, 1/4, 1/9 -> 36/49, 9/49, 4/49.
    assert fedhl_weights(errors, "optimal_paper") == pytest.approx({0: 36 / 49, 1: 9 / 49, 2: 4 / 49}, rel=1e-5)
    assert fedhl_weights(errors, "uniform") == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    examples = {0: 1.0, 1: 1.0, 2: 2.0}
    assert fedhl_weights(errors, "examples", examples) == pytest.approx({0: 0.25, 1: 0.25, 2: 0.5})
    total_q = 1 / 17 + 1 / 26 + 2 / 41
    assert fedhl_weights(errors, "optimal_examples", examples) == pytest.approx(
        {0: 1 / 17 / total_q, 1: 1 / 26 / total_q, 2: 2 / 41 / total_q}
    )
    # Round 0: every error is zero -> uniform (optimal_examples: q).
    zero = {0: 0.0, 1: 0.0, 2: 0.0}
    for weighting in ("optimal", "optimal_paper"):
        assert fedhl_weights(zero, weighting) == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    assert fedhl_weights(zero, "optimal_examples", examples) == pytest.approx({0: 0.25, 1: 0.25, 2: 0.5})
    with pytest.raises(FedLoraError, match="weighting"):
        build("fedhl", make_ctx({0: 1}), weighting="optimal_papr")


def toy_run(weighting: str, rounds: int = 10) -> list[dict[str, float]]:
    """Clients of ranks 1, 2, 4 on a 6x5 module move their factors by seeded noise each round."""
    ctx = make_ctx({0: 1, 1: 1, 2: 1}, shapes={MID: (6, 5)}, alpha=1.0, ranks={0: 1, 1: 2, 2: 4})
    algo = build("fedhl", ctx, weighting=weighting)
    gen = torch.Generator().manual_seed(0)
    for rnd in range(rounds):
        payloads = algo.configure(rnd, [0, 1, 2])
        updates = {}
        for c, p in payloads.items():
            moved = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in p.tensors.items()}
            updates[c] = Update(moved, 1)
        algo.aggregate(rnd, updates)
    return [dict(w) for w in algo.structure()["weights"].values()]


def test_scale_aware_eps_keeps_every_weight_while_the_paper_eps_collapses() -> None:
    paper = toy_run("optimal_paper")
    guarded = toy_run("optimal")
    assert paper[0] == pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3})  # round 0: uniform
    assert min(paper[-1].values()) < 1e-3  # collapsed onto the highest rank
    assert max(paper[-1], key=paper[-1].__getitem__) == "2"
    # With eps = mean e^2, every weight stays >= 1 / (m (m + 1)) = 1/12 for m = 3.
    assert min(min(w.values()) for w in guarded) >= 1 / 12


def test_fedhl_structure_and_resume_state() -> None:
    ctx = make_ctx({0: 1, 1: 1}, shapes={MID: (4, 3)}, alpha=2.0, ranks={0: 1, 1: 3})
    algo = build("fedhl", ctx)
    gen = torch.Generator().manual_seed(2)
    for rnd in range(2):
        payloads = algo.configure(rnd, [0, 1])
        algo.aggregate(
            rnd,
            {
                c: Update({k: v + torch.randn(v.shape, generator=gen) for k, v in p.tensors.items()}, 1)
                for c, p in payloads.items()
            },
        )
    structure = algo.structure()
    assert structure["ranks"] == {"0": 1, "1": 3}
    assert set(structure["weights"]) == {"0", "1"}
    assert structure["truncation_errors"]["1"]["1"] == pytest.approx(0.0, abs=1e-6)  # rank 3 holds a 4x3 update
    assert structure["truncation_errors"]["1"]["0"] > 0.0
    tensors, meta = algo.state_dict()
    restored = build("fedhl", ctx)
    restored.load_state_dict(tensors, meta)
    assert restored.structure() == structure
    assert_close(restored.global_payload().tensors[DW], algo.delta[MID])
    assert restored.global_payload().layout.modules[MID].folded


# --- flora --------------------------------------------------------------------------------
def test_flora_stack_is_the_exact_weighted_mean_of_products_non_square() -> None:
    # Module 2x3; alpha 2: s = 2 (rank 1), 1 (rank 2). q = 1/4, 3/4.
    ctx = make_ctx({0: 1, 1: 3, 2: 5}, shapes={MID: (2, 3)}, alpha=2.0, ranks={0: 1, 1: 2, 2: 2})
    algo = build("flora", ctx)
    updates = {
        0: lora([[1.0, 0.0, 1.0]], [[1.0], [2.0]], 1),
        1: lora([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], 3),
    }
    # s B A: client 0 [[2,0,2],[4,0,4]], client 1 [[1,1,0],[0,0,1]] -> 1/4, 3/4 mean:
    expected = torch.tensor([[1.25, 0.75, 0.5], [1.0, 0.0, 1.75]])
    b_st, a_st = stacked_product(
        [
            (2.0 * updates[0].tensors[f"{L}.B"], updates[0].tensors[f"{L}.A"]),
            (1.0 * updates[1].tensors[f"{L}.B"], updates[1].tensors[f"{L}.A"]),
        ],
        [0.25, 0.75],
    )
    assert b_st.shape == (2, 3) and a_st.shape == (3, 3)
    assert torch.equal(b_st @ a_st, expected)
    assert algo.configure(0, [0, 1])[0].download_bytes() == 0  # nothing to merge yet
    algo.aggregate(0, updates)
    assert torch.equal(algo.global_payload().tensors[DW], expected)
    # A client of round 0 downloads round 0's stack: (2 + 3) x (1 + 2) fp32 values.
    payloads = algo.configure(1, [0, 2])
    stack0 = (2 + 3) * 3 * 4
    assert payloads[0].download_bytes() == stack0
    assert payloads[0].layout.modules[MID].folded
    assert torch.equal(payloads[0].tensors[DW], expected)
    # Client 2 missed round 0; after round 1 (clients 0 and 2, ranks 1 and 2) it needs the round-1 stack
    # in round 2 only if it took part, and client 1 (absent in round 1) needs both stacks.
    algo.aggregate(1, {0: lora([[1.0, 0.0, 0.0]], [[1.0], [0.0]], 1), 2: lora([[0.0] * 3] * 2, [[0.0] * 2] * 2, 5)})
    payloads = algo.configure(2, [0, 1, 2])
    stack1 = (2 + 3) * 3 * 4
    assert payloads[0].download_bytes() == stack1
    assert payloads[2].download_bytes() == stack1
    assert payloads[1].download_bytes() == stack0 + stack1
    # q = 1/6, 5/6 in round 1: + 1/6 * 2 * [[1,0,0],[0,0,0]].
    assert_close(payloads[1].tensors[DW], expected + torch.tensor([[1 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# --- SVD ------------------------------------------------------------------------------------
def test_full_and_randomized_svd_agree_on_the_top_values() -> None:
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(300, 40, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(200, 40, generator=gen))
    spectrum = 10.0 * 0.7 ** torch.arange(40, dtype=torch.float32)
    matrix = (u * spectrum) @ v.T + 1e-4 * torch.randn(300, 200, generator=gen)
    full = top_svd(matrix, 8, method="full")
    low = top_svd(matrix, 8, method="lowrank", seed=0)
    assert_close(low.s, full.s, rtol=1e-4, atol=0)
    assert_close(low.s, spectrum[:8], rtol=1e-3, atol=0)
    # The leading subspaces agree too (up to sign).
    assert_close((low.u.T @ full.u).abs().diagonal(), torch.ones(8), atol=1e-3, rtol=0)
    # Deterministic for a seed.
    assert torch.equal(top_svd(matrix, 8, method="lowrank", seed=0).s, low.s)


def test_dense_methods_export_a_folded_global_model() -> None:
    ctx = make_ctx({0: 1, 1: 1}, shapes={MID: (4, 3)}, ranks={0: 1, 1: 2})
    for name in ("flexlora", "flora", "fedhl"):
        payload = build(name, ctx).global_payload()
        assert list(payload.tensors) == [delta_key(MID)]
        assert payload.layout.modules[MID].folded and not payload.layout.modules[MID].slots


# --- end to end through the CLI -----------------------------------------------------------
SMOKE = str(ROOT / "configs" / "smoke.toml")
MIXED = ["--set", "model.ranks=[2,4,8]", "--set", "federation.fraction=0.5", "--quiet"]


@pytest.mark.parametrize("algorithm", ["zeropad", "hetlora", "flexlora", "flora", "fedhl"])
def test_cli_mixed_ranks_partial_participation(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(out), "--set", f"algorithm.name='{algorithm}'", "--set", "run.rounds=3"]
    assert main([*args, *MIXED]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structure"]["ranks"] == {"0": 2, "1": 4, "2": 8, "3": 2}
    assert summary["final"]["global_acc"] is not None
    clients = [r for r in run_rows(out) if r["client"] is not None]
    assert len(clients) == 3 * 2  # 2 of 4 clients per round
    for row in clients:
        # tiny-bert: 2 layers x (query, value), 32 x 32: a rank-r LoRA is 4 x r x 64 fp32 values.
        assert row["bytes_up"] == 1024 * summary["ranks"][str(row["client"])]
        if algorithm != "flora":
            assert row["bytes_down"] == row["bytes_up"]
    if algorithm == "fedhl":
        assert set(summary["structure"]["weights"]) == {"0", "1", "2"}
        for rnd, weights in summary["structure"]["weights"].items():
            assert sum(weights.values()) == pytest.approx(1.0)
            assert set(weights) == set(summary["structure"]["truncation_errors"][rnd])


def test_cli_fedhl_resume_is_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    fedhl = ["--set", "algorithm.name='fedhl'", *MIXED]
    assert main(["run", SMOKE, "--out", str(straight), "--set", "run.rounds=4", *fedhl]) == 0
    assert main(["run", SMOKE, "--out", str(resumed), "--set", "run.rounds=2", *fedhl]) == 0
    assert main(["run", "--resume", str(resumed), "--set", "run.rounds=4", "--quiet"]) == 0
    assert run_rows(straight) == run_rows(resumed)
    first = json.loads((straight / "summary.json").read_text())["structure"]
    assert json.loads((resumed / "summary.json").read_text())["structure"] == first
    assert (straight / "plots" / "fedhl_weights.png").stat().st_size > 1000
