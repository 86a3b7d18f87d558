"""SecAgg+ core: real client stages against the real server state machine, in process."""

from __future__ import annotations

import numpy as np
import pytest

from fedslm.client import secagg as client
from fedslm.config import SecureAggregationConfig
from fedslm.secagg import crypto, ring
from fedslm.secagg.protocol import Graph, threshold
from fedslm.server.secagg import Abandoned, mean_update
from tests.secagg_util import entropy, run_round

SA = SecureAggregationConfig(method="secaggplus", quantization_bits=8, modulus_bits=16, threshold=3)
BITS = SA.modulus_bits


def inputs(n: int, size: int = 50, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {100 + i: rng.integers(0, 1 << SA.quantization_bits, size, dtype=np.uint64) for i in range(n)}


def exact_sum(values, nodes) -> np.ndarray:
    return sum(values[n] for n in nodes) % (1 << BITS)


def test_sum_is_bit_exact_without_dropouts() -> None:
    values = inputs(5)
    run, total = run_round(values, sa=SA)
    np.testing.assert_array_equal(total, exact_sum(values, values))
    assert total.dtype == np.uint64 and run.server.dropped == []


@pytest.mark.parametrize("dropped", [{101}, {100, 103}])
def test_sum_is_bit_exact_with_dropouts_up_to_the_threshold(dropped) -> None:
    values = inputs(5)  # threshold 3 of 5: up to 2 may drop after sharing their keys
    run, total = run_round(values, sa=SA, drop_after_shares=dropped)
    np.testing.assert_array_equal(total, exact_sum(values, set(values) - dropped))
    assert run.server.dropped == sorted(dropped)


def test_fewer_survivors_than_the_threshold_abandons_the_round() -> None:
    with pytest.raises(Abandoned, match="masked input collection: 2 client\\(s\\) left, threshold 3"):
        run_round(inputs(5), sa=SA, drop_after_shares={100, 101, 102})


def test_too_few_unmasking_replies_abandon_the_round() -> None:
    with pytest.raises(Abandoned, match="unmasking: 2 share\\(s\\) of client 100's secret, threshold 3"):
        run_round(inputs(4), sa=SA, drop_before_unmask={101, 102})


def test_sparse_neighbourhoods_sum_exactly_with_a_dropout() -> None:
    sa = SecureAggregationConfig(method="secaggplus", quantization_bits=8, modulus_bits=16,
                                 num_neighbours=4, threshold=3)
    values = inputs(9)
    run, total = run_round(values, sa=sa, drop_after_shares={104})
    assert all(len(p) == 4 for p in run.server.graph.neighbours.values())
    np.testing.assert_array_equal(total, exact_sum(values, set(values) - {104}))


@pytest.mark.parametrize("dropped", [set(), {102}])
def test_a_weighted_sum_is_bit_exact_and_divides_by_the_survivors_weights(dropped) -> None:
    """Hand-built updates on the quantization grid (multiples of 1/32, 8 bits over [-1, 1]:
    step 1/128) scaled by w/W with W = 4: every scaled value is a grid point, so
    stochastic rounding never rounds and the ring sum is known exactly."""
    updates = {100: np.array([0.5, -1.0, 0.25, 0.0]), 101: np.array([-0.5, 1.0, 0.75, -0.25]),
               102: np.array([1.0, 1.0, -1.0, 0.125]), 103: np.array([0.0, -0.5, 0.5, 1.0])}
    weights, top = {100: 1, 101: 2, 102: 4, 103: 2}, 4
    values = {}
    for node, x in updates.items():
        values[node], _ = client.prepare_update([x], sa=SA, clip_norm=0.0, noise_std=0.0, scale=weights[node] / top,
                                                rng=np.random.default_rng(node))
        np.testing.assert_array_equal(values[node], (x * weights[node] / top + 1) * 128)
    run, total = run_round(values, sa=SA, drop_after_shares=dropped)
    survivors = sorted(set(updates) - dropped)
    np.testing.assert_array_equal(total, sum((updates[n] * weights[n] / top + 1) * 128 for n in survivors))
    weight_total = sum(weights[n] for n in survivors) / top
    expected = sum(weights[n] * updates[n] for n in survivors) / sum(weights[n] for n in survivors)
    np.testing.assert_allclose(mean_update(total, len(survivors), sa=SA, weight_total=weight_total), expected,
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("weight, top", [(0, 4), (5, 4), (True, 4), (2.0, 4), (None, None)])
def test_a_client_refuses_a_weight_outside_0_to_the_rounds_largest(weight, top) -> None:
    with pytest.raises(client.ProtocolAbort, match="expected 0 < w <= W"):
        client.weight_scale(weight, top)
    assert client.weight_scale(3, 4) == 0.75


def test_graph_is_symmetric_and_k_regular() -> None:
    import random
    g = Graph.build(list(range(1, 12)), 4, random.Random(1))
    for node, peers in g.neighbours.items():
        assert len(peers) == 4 and node not in peers
        assert all(node in g.neighbours[p] for p in peers)
    assert Graph.build([1, 2, 3], 4, random.Random(1)).neighbours == {1: (2, 3), 2: (1, 3), 3: (1, 2)}


def test_threshold_from_fraction_and_count() -> None:
    assert threshold(SecureAggregationConfig(threshold_fraction=0.6), 10) == 6
    assert threshold(SecureAggregationConfig(threshold_fraction=0.6, num_neighbours=4), 10) == 3
    assert threshold(SecureAggregationConfig(threshold=4), 10) == 4
    assert threshold(SecureAggregationConfig(threshold_fraction=0.1), 3) == 2  # never below 2


def test_the_server_never_holds_a_clients_input() -> None:
    values = inputs(4, size=400)
    run, total = run_round(values, sa=SA, drop_after_shares={102})
    vectors = [r for stage, _, r in run.received if stage == "masked"]
    assert len(vectors) == 3
    blobs = b"".join(_bytes_of(r) for _, _, r in run.received)
    for _node, x in values.items():
        for v in vectors:
            assert not np.array_equal(v, x)
            # uniform masks: no correlation with any input (|r| < 0.2 at 400 values)
            assert abs(np.corrcoef(v.astype(float), x.astype(float))[0, 1]) < 0.2
        assert x.astype("<u8").tobytes() not in blobs and x.astype("<u2").tobytes() not in blobs
    np.testing.assert_array_equal(total, exact_sum(values, {100, 101, 103}))


def _bytes_of(reply) -> bytes:
    if isinstance(reply, np.ndarray):
        return reply.astype("<u8").tobytes()
    if isinstance(reply, dict):
        return b"".join(_bytes_of(v) for v in reply.values())
    if isinstance(reply, (tuple, list)):
        return b"".join(_bytes_of(v) for v in reply)
    return bytes(reply)


def test_masks_are_reproducible_from_a_fixed_seed_and_fresh_otherwise() -> None:
    values = inputs(3)
    first = run_round(values, sa=SA)[0].received
    again = run_round(values, sa=SA)[0].received
    fresh = run_round(values, sa=SA, seeded=False)[0].received
    masked = lambda rec: [r for s, _, r in rec if s == "masked"]  # noqa: E731
    for a, b, c in zip(masked(first), masked(again), masked(fresh)):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_a_wrong_share_is_caught_and_its_holder_named() -> None:
    values = inputs(5)

    def forge(stage, node, reply):
        if stage == "unmask" and node == 100:  # in the first subset the server tries
            b, keys = reply
            return {o: bytes([s[0] ^ 0]) + s[1:4] + bytes(16) * ((len(s) - 4) // 16) for o, s in b.items()}, keys
        return reply

    run, total = run_round(values, sa=SA, tamper=forge)
    np.testing.assert_array_equal(total, exact_sum(values, values))
    assert set(run.server.liars) == {100}


def _replaying(values, recipients: set[int]):
    """Client 101 sends its round-1 ciphertexts again in round 2 to ``recipients``."""
    old = run_round(values, sa=SA, server_round=1)[0]
    old_shares = next(r for stage, node, r in old.received if stage == "shares" and node == 101)

    def replay(stage, node, reply):
        if stage == "shares" and node == 101:
            return {dst: old_shares[dst] if dst in recipients else ct for dst, ct in reply.items()}
        return reply
    return replay


def test_a_replayed_ciphertext_from_another_round_holds_no_share() -> None:
    """Replayed round-1 ciphertexts do not decrypt under round 2's keys: the recipient
    holds no share of the replayer, and the round still sums exactly."""
    values = inputs(5)
    run, total = run_round(values, sa=SA, server_round=2, tamper=_replaying(values, {103}))
    assert 101 not in run.clients[103].held and 101 in run.clients[102].held
    assert run.server.complaints == {101: {103}}
    np.testing.assert_array_equal(total, exact_sum(values, values))


def test_a_client_whose_shares_no_one_can_decrypt_is_named_when_the_round_is_abandoned() -> None:
    values = inputs(5)
    with pytest.raises(Abandoned, match=r"client 101's secret, threshold 3; 4 neighbour\(s\) could not decrypt"):
        run_round(values, sa=SA, server_round=2, tamper=_replaying(values, {100, 102, 103, 104}))


@pytest.mark.parametrize("forge, why", [
    (lambda own, other: other, "public key reused (replayed or copied)"),          # 100's keys, replayed
    (lambda own, other: (own[1], own[1], own[2]), "public key reused"),             # one key for both uses
    (lambda own, other: (b"\x05" + bytes(32), own[1], own[2]), "not a P-256 point"),
    (lambda own, other: (own[0], own[1], own[2][:16]), "commitment is not 32 bytes"),
])
def test_a_bad_key_advertisement_is_refused_and_the_round_sums_the_others(forge, why) -> None:
    values = inputs(5)
    advertised = {}

    def tamper(stage, node, reply):
        if stage == "keys":
            advertised[node] = reply
            if node == 101:
                return forge(reply, advertised[100])
        return reply

    run, total = run_round(values, sa=SA, tamper=tamper)
    assert why in run.server.rejected[101] and 101 not in run.server.shared
    np.testing.assert_array_equal(total, exact_sum(values, set(values) - {101}))


@pytest.mark.parametrize("bad, why", [
    (lambda v: v[:-1], "shape"),
    (lambda v: v.astype(np.int64), "dtype"),
    (lambda v: v + np.uint64(1 << BITS), "outside"),
])
def test_a_malformed_masked_vector_is_treated_as_a_dropout(bad, why) -> None:
    values = inputs(5)
    run, total = run_round(values, sa=SA, tamper=lambda s, n, r: bad(r) if s == "masked" and n == 102 else r)
    assert why in run.server.rejected[102]
    np.testing.assert_array_equal(total, exact_sum(values, set(values) - {102}))


def test_an_out_of_range_input_abandons_the_round() -> None:
    values = inputs(3)
    values[101] = np.full(50, 1 << (BITS - 1), dtype=np.uint64)  # far above 2^quantization_bits
    with pytest.raises(Abandoned, match="outside what honest inputs can add to"):
        run_round(values, sa=SA)


def test_a_client_refuses_to_reveal_both_secrets_of_one_peer_or_reveal_twice() -> None:
    state = client.ClientRound(1, 100, entropy(100), threshold=3, masked_with=[101, 102, 103])
    with pytest.raises(client.ProtocolAbort, match="both survivor and dropped"):
        client.reveal(state, [100, 101, 102], [101])
    with pytest.raises(client.ProtocolAbort, match="only 2 survivors, threshold 3"):
        client.reveal(state, [100, 101], [102, 103])
    client.reveal(state, [100, 101, 102], [103])
    with pytest.raises(client.ProtocolAbort, match="already revealed"):
        client.reveal(state, [100, 101, 102], [103])


def test_a_client_refuses_a_threshold_the_config_does_not_give() -> None:
    state, _ = client.advertise_keys(1, 100, entropy=entropy(100))
    peers = {101: client.advertise_keys(1, 101, entropy=entropy(101))[1]}
    with pytest.raises(client.ProtocolAbort, match="threshold 2, the config gives 3"):
        client.share_keys(state, {101: (peers[101]["pk-enc"], peers[101]["pk-mask"])},
                          threshold=2, expected_threshold=3)


def test_prg_masks_are_uniform_in_the_ring_and_fixed_by_the_seed() -> None:
    mask = crypto.expand_mask(bytes(32), 4, 16)
    np.testing.assert_array_equal(mask, crypto.expand_mask(bytes(32), 4, 16))
    assert mask.dtype == np.uint64 and int(mask.max()) < 1 << 16
    big = crypto.expand_mask(b"\x01" * 32, 100_000, 16)
    assert abs(big.mean() / (1 << 16) - 0.5) < 0.01


def test_quantization_is_unbiased_and_dequantizes_a_sum() -> None:
    rng = np.random.default_rng(0)
    q = ring.quantize(np.array([-2.0, -1.0, 0.0, 0.25, 1.0, 5.0]), clipping_range=1.0,
                      quantization_bits=3, rng=rng)
    np.testing.assert_array_equal(q, [0, 0, 4, 5, 8, 8])  # 0.25 -> 5 exactly (4 + 0.25*4)
    total = q + q
    np.testing.assert_allclose(ring.dequantize_sum(total, 2, clipping_range=1.0, quantization_bits=3),
                               [-2.0, -2.0, 0.0, 0.5, 2.0, 2.0])
    draws = ring.quantize(np.full(20000, 0.1), clipping_range=1.0, quantization_bits=3, rng=rng)
    assert abs(ring.dequantize_sum(draws, 1, clipping_range=1.0, quantization_bits=3).mean() - 0.1) < 0.01


def test_auto_weighting_is_what_plain_aggregation_does() -> None:
    from fedslm.config import ExperimentConfig
    from fedslm.secagg.protocol import weighted

    def cfg(**data):
        return ExperimentConfig.from_dict({"secure_aggregation": {"method": "secaggplus"}, **data})
    assert weighted(cfg()) and not weighted(cfg(privacy={"mode": "dp_fedavg"}))
    assert not weighted(cfg(secure_aggregation={"method": "secaggplus", "weighting": "equal"}))


@pytest.mark.parametrize("override, message", [
    ({"compression": {"method": "int8"}}, "compression.method: must be none with secure_aggregation.method=secaggplus"),
    ({"privacy": {"mode": "dp_fedavg", "clipping": "adaptive", "clipped_count_stddev": 1.0}},
     "privacy.clipping: must be fixed with secure_aggregation.method=secaggplus"),
    ({"secure_aggregation": {"quantization_bits": 30}}, "secure_aggregation.modulus_bits: 2^32 must exceed "
     "federation.num_clients=10 x 2^secure_aggregation.quantization_bits=30"),
    ({"secure_aggregation": {"num_neighbours": 3}}, "secure_aggregation.num_neighbours: must be an even number"),
    ({"secure_aggregation": {"threshold": 1}}, "secure_aggregation.threshold: must be 0"),
    ({"personalization": {"method": "dual"}}, "personalization.method: must be none with secure_aggregation"),
    ({"secure_aggregation": {"weighting": "examples"}, "privacy": {"mode": "dp_fedavg"}},
     "secure_aggregation.weighting: must be equal or auto with privacy.mode=dp_fedavg"),
    ({"secure_aggregation": {"weighting": "by_loss"}}, "secure_aggregation.weighting: unknown value 'by_loss'"),
])
def test_config_refuses_what_secagg_cannot_combine_with(override, message) -> None:
    from fedslm.config import ConfigError, ExperimentConfig
    data = {"secure_aggregation": {"method": "secaggplus"}}
    for group, values in override.items():
        data.setdefault(group, {}).update(values)
    with pytest.raises(ConfigError, match="^" + message.replace("^", "\\^").replace("(", "\\(")):
        ExperimentConfig.from_dict(data)
