"""The aggregation rules' math on hand-built LoRA factors: exact where the rule is exact,
and the gap where it is not."""

from __future__ import annotations

import numpy as np
import pytest

from fedslm.aggregation import fedavg, ffa, flexlora, flora
from fedslm.aggregation.lora_factors import fit_to_shapes, float32_bytes, pad, rank_of, truncate
from fedslm.aggregation.ranks import (RankSpecError, assign_ranks, parse_ranks, rank_for_partition,
                                      ranks_by_share)

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _client(seed: int, rank: int, out: int = 6, inp: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.standard_normal((rank, inp)).astype(np.float32),
            B: rng.standard_normal((out, rank)).astype(np.float32)}


def _product_mean(clients, counts) -> np.ndarray:
    w = np.asarray(counts, np.float64) / sum(counts)
    return sum(wi * (c[B].astype(np.float64) @ c[A].astype(np.float64)) for wi, c in zip(w, clients))


def test_flora_stacking_is_exactly_the_weighted_mean_of_products_and_fedavg_is_not() -> None:
    clients, counts = [_client(1, 2), _client(2, 2), _client(3, 2)], [10, 30, 60]
    w = np.array([0.1, 0.3, 0.6])
    b_s, a_s = flora.stack([(c[B], c[A]) for c in clients], w)
    assert b_s.shape == (6, 6) and a_s.shape == (6, 5)  # rank 2 + 2 + 2
    np.testing.assert_allclose(b_s @ a_s, _product_mean(clients, counts), rtol=0, atol=1e-12)
    # FedAvg on the same factors: mean(B) @ mean(A) is off by exactly the cross terms
    # sum_{i != j} w_i w_j B_i A_j - sum_i w_i (1 - w_i) B_i A_i
    avg = fedavg.aggregate(clients, counts, rank=2)
    gap = avg[B].astype(np.float64) @ avg[A] - _product_mean(clients, counts)
    f = [(c[B].astype(np.float64), c[A].astype(np.float64)) for c in clients]
    cross = sum(w[i] * w[j] * f[i][0] @ f[j][1] for i in range(3) for j in range(3) if i != j)
    cross -= sum(w[i] * (1 - w[i]) * f[i][0] @ f[i][1] for i in range(3))
    np.testing.assert_allclose(gap, cross, atol=1e-5)
    assert np.abs(gap).max() > 0.5
    # re-factored at the stacked rank, the global adapter is the exact mean
    glob, residual = flora.aggregate(clients, counts, rank=6)
    assert residual < 1e-7
    np.testing.assert_allclose(glob[B].astype(np.float64) @ glob[A], _product_mean(clients, counts),
                               atol=2e-5)


def test_flora_stacks_heterogeneous_ranks_exactly() -> None:
    clients, counts = [_client(4, 1), _client(5, 2), _client(6, 4)], [1, 1, 2]
    glob, residual = flora.aggregate(clients, counts, rank=7)
    assert glob[A].shape == (7, 5) and glob[B].shape == (6, 7) and residual < 1e-7
    np.testing.assert_allclose(glob[B].astype(np.float64) @ glob[A], _product_mean(clients, counts),
                               atol=2e-5)


def _best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("rule", [flexlora, flora])
def test_redistributed_factors_are_the_best_rank_r_approximation(rule) -> None:
    clients, counts = [_client(7, 4), _client(8, 4), _client(9, 4)], [5, 3, 2]
    m = _product_mean(clients, counts)  # rank 5 (min(6, 5)) > global rank 4
    glob, residual = rule.aggregate(clients, counts, rank=4)
    s = np.linalg.svd(m, compute_uv=False)
    assert residual == pytest.approx(s[4] / np.sqrt(np.sum(s ** 2)), rel=1e-6)
    for r in (1, 2, 4):  # each client rank gets the top-r components of the global
        mine = truncate(glob, r)
        assert mine[A].shape == (r, 5) and mine[B].shape == (6, r)
        np.testing.assert_allclose(mine[B].astype(np.float64) @ mine[A], _best_rank(m, r), atol=2e-5)


def test_flora_and_flexlora_give_the_same_global_product() -> None:
    clients, counts = [_client(10, 2), _client(11, 3)], [4, 6]
    g1, _ = flora.aggregate(clients, counts, rank=3)
    g2, _ = flexlora.aggregate(clients, counts, rank=3)
    np.testing.assert_allclose(g1[B].astype(np.float64) @ g1[A], g2[B].astype(np.float64) @ g2[A],
                               atol=2e-5)


def test_ffa_keeps_a_out_of_the_messages_and_averaging_b_is_exact() -> None:
    shared_a = _client(0, 4)[A]
    clients = [{A: shared_a, B: _client(s, 4)[B]} for s in (1, 2, 3)]
    sent = [ffa.travelling(c) for c in clients]
    assert all(set(s) == {B} for s in sent)
    glob = ffa.aggregate(sent, [2, 3, 5])
    np.testing.assert_allclose(glob[B].astype(np.float64) @ shared_a, _product_mean(clients, [2, 3, 5]),
                               atol=2e-5)
    # bytes per message: B only, (6 x 4) float32 = 96 of the 176 bytes of A and B
    assert float32_bytes(sent[0]) == 96 and float32_bytes(clients[0]) == 176
    with pytest.raises(ValueError, match="must not carry A"):
        ffa.aggregate(clients, [1, 1, 1])


def test_pad_and_fit_to_shapes_round_trip_and_keep_the_product() -> None:
    small = _client(12, 2)
    padded = pad(small, 4)
    assert padded[A].shape == (4, 5) and padded[B].shape == (6, 4) and rank_of(padded) == 4
    np.testing.assert_array_equal(padded[B] @ padded[A], small[B] @ small[A])
    back = fit_to_shapes(padded, {A: (2, 5), B: (6, 2)})
    np.testing.assert_array_equal(back[A], small[A])
    np.testing.assert_array_equal(back[B], small[B])


def test_fedavg_with_mixed_ranks_zero_pads_heterogeneous_replies() -> None:
    r2, r4 = _client(13, 2), _client(14, 4)
    glob = fedavg.aggregate([r2, r4], [1, 1], rank=4)
    np.testing.assert_allclose(glob[A][:2], (r2[A] + r4[A][:2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(glob[A][2:], r4[A][2:] / 2, rtol=1e-6)


def test_rank_spec_parses_shares_and_partition_ranges() -> None:
    spec = parse_ranks("30% r=4, 50% r=8, 20% r=16")
    assert spec.shares == ((0.3, 4), (0.5, 8), (0.2, 16)) and spec.ranks == (4, 8, 16)
    got = ranks_by_share([40, 10, 30, 20, 50, 60, 70, 80, 90, 100], spec.shares)
    assert [got[n] for n in sorted(got)] == [4, 4, 4, 8, 8, 8, 8, 8, 16, 16]
    assert sorted(ranks_by_share([3, 1, 2], spec.shares).values()) == [4, 8, 16]  # 0.9, 1.5, 0.6
    parts = parse_ranks("0-2 r=4, 5 r=2, * r=8")
    assert [rank_for_partition(p, parts) for p in (0, 2, 3, 5, None)] == [4, 4, 8, 2, 2]
    assert assign_ranks(parts, [7, 9], default_rank=8, partitions={7: 1}) == {7: 4, 9: 2}
    assert assign_ranks(parse_ranks(""), [7], default_rank=8) == {7: 8}
    for bad, why in (("30% r=4", "sum to 30%"), ("4 r=x", "expected"), ("50% r=4, 0 r=8", "mixes"),
                     ("3-1 r=4", "empty")):
        with pytest.raises(RankSpecError, match=why):
            parse_ranks(bad)


@pytest.mark.parametrize("rule", [flexlora, flora])
def test_components_the_product_lacks_keep_b_zero_and_a_trainable(rule) -> None:
    clients, counts = [_client(15, 1), _client(16, 1)], [1, 1]  # product rank 2 < global rank 4
    glob, residual = rule.aggregate(clients, counts, rank=4)
    assert residual < 1e-12
    np.testing.assert_array_equal(glob[B][:, 2:], 0.0)
    assert (np.linalg.norm(glob[A][2:], axis=1) > 0.1).all()  # not dead: B's gradient flows
    np.testing.assert_allclose(glob[B].astype(np.float64) @ glob[A], _product_mean(clients, counts),
                               atol=2e-5)
