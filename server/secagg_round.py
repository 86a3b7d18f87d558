"""SecAgg+ as the train phase of FedSLM's round loop: four Message-API round trips
(``send_and_collect``: deadlines, message-id matching, progress) around the state
machine of ``fedslm.server.secagg``, then the unmasked mean handed to the Flower strategy.

The mean is equal-weight or, in a weighted round (``secure_aggregation.weighting``), by
each client's capped example count, as plain FedAvg weights: the counts travel in clear
with the keys, are capped here exactly as ``fedslm.server.screening`` caps a plain
reply's, and each client scales its update by w/W before masking.

The strategy still decides whom to sample (``configure_train``) and how the mean moves
the global adapter (``aggregate_train`` gets one reply holding global + mean update with
unit weight: FedAvg/FedProx take it as is, FedAvgM/FedAdam/... apply their server
optimizer to it). With ``privacy.mode=dp_fedavg`` the clients clip and add the noise and
this module keeps the ``UserLevelDp`` ledger: it records the release the unmasked sum
actually is (noise multiplier z * sqrt(survivors / threshold) >= z).

A round that cannot be unmasked is abandoned whole: the global adapter, the privacy
ledger and the checkpoint stay as they were (a round is atomic).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslm.adapters import payload_bytes
from fedslm.config import ExperimentConfig
from fedslm.secagg import protocol as P
from fedslm.secagg.ring import unflatten
from fedslm.replies import weight_problem
from fedslm.wire import WireError, decode_array
from fedslm.server.dp_fedavg import UserLevelDp
from fedslm.server.messaging import Collected, send_and_collect
from fedslm.server.metrics import client_rows, dropped_rows, summarize
from fedslm.server.privacy import Release, save_server_privacy
from fedslm.server.secagg import Abandoned, SecAggRound, mean_update
from fedslm.server.screening import known_size_cap
from fedslm.server.screening import weight_cap as weight_cap_of
from fedslm.server.strategy import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

if TYPE_CHECKING:
    from fedslm.server.rounds import RoundPlan


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor data, bytes values, 8 per number (keys excluded)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += payload_bytes(record)
            continue
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


@dataclass
class Traffic:
    down: int = 0
    up: int = 0
    update_up: int = 0  # the masked vectors themselves
    server_seconds: float = 0.0
    client_seconds: float = 0.0  # protocol work the clients report (training excluded)
    weight_total: int = 0  # the survivors' capped weights (equal: their number)


class SecureTrain:
    """The round loop's train phase under SecAgg+ (``RoundPlan.secure``)."""

    def __init__(self, cfg: ExperimentConfig, strategy: Strategy) -> None:
        self.cfg, self.sa = cfg, cfg.secure_aggregation
        self.weighted = P.weighted(cfg)
        self.dp = strategy if isinstance(strategy, UserLevelDp) else None
        self.stopped: str | None = None
        self.abandoned_total = 0

    def stop_reason(self) -> str | None:
        return self.stopped

    def train_phase(self, grid: Grid, strategy: Strategy, plan: RoundPlan, server_round: int,
                    arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float], list[dict]]:
        label = f"[round {server_round}/{plan.num_rounds}] secagg"
        train_msgs = {m.metadata.dst_node_id: m
                      for m in strategy.configure_train(server_round, arrays, plan.train_config, grid)}
        like = [v.numpy() for v in arrays.values()]
        rnd = SecAggRound(self.sa, server_round, sorted(train_msgs), sum(a.size for a in like))
        traffic, rows, refused = Traffic(), [], []
        metrics: dict[str, float] = {"clients_sampled": float(len(train_msgs))}
        try:
            if not train_msgs:
                raise Abandoned("no clients sampled")
            total, weight_total, accepted, refused, rows = self._protocol(grid, plan, rnd, train_msgs,
                                                                          traffic, label)
        except Abandoned as why:
            self.abandoned_total += 1
            log(WARNING, "%s: round abandoned, global adapter unchanged: %s", label, why)
            if self.dp is not None:
                self.dp._pending.pop(server_round, None)
                self.dp.last_round = {}
            if self.sa.on_abandon == "stop":
                self.stopped = f"secure aggregation abandoned round {server_round}: {why}"
            metrics.update(self._metrics(rnd, traffic, abandoned=True))
            rows += [{"round": server_round, "phase": "train", "node_id": n, "status": "rejected",
                      "error": why[:200]} for n, why in sorted(rnd.rejected.items())]
            return arrays, metrics, rows
        mean = unflatten(mean_update(total, len(rnd.masked), sa=self.sa, weight_total=weight_total), like)
        new = ArrayRecord({k: Array(np.asarray(a + d, dtype=a.dtype))
                           for k, a, d in zip(arrays.keys(), like, mean, strict=True)})
        inner = self.dp.strategy if self.dp is not None else strategy
        first = train_msgs[min(rnd.masked)]
        reply = Message(RecordDict({ARRAYS_KEY: new, METRICS_KEY: MetricRecord({WEIGHT_KEY: 1})}),
                        reply_to=first)
        aggregated, _ = inner.aggregate_train(server_round, [reply])
        metrics.update(summarize(client_rows("train", server_round, accepted), "train_"))
        metrics.update(self._metrics(rnd, traffic, abandoned=False))
        if self.dp is not None:
            metrics.update(self._release(server_round, len(rnd.masked), rnd.threshold))
        if plan.privacy is not None:
            metrics.update(plan.privacy.round_metrics(server_round, rows, refused))
            rows += client_rows("refused", server_round, refused)
        return (aggregated if aggregated is not None else new), metrics, rows

    def _protocol(self, grid, plan, rnd: SecAggRound, train_msgs: dict[int, Message],
                  traffic: Traffic, label: str):
        _sa, group = self.sa, str(rnd.server_round)

        def trip(stage: str, requests: dict[int, RecordDict]) -> Collected:
            msgs = [Message(content, dst_node_id=node, message_type=P.MESSAGE_TYPES[stage], group_id=group)
                    for node, content in requests.items()]
            traffic.down += sum(record_bytes(m.content) for m in msgs)
            got = send_and_collect(grid, msgs, timeout=plan.timeout, label=f"{label} {stage}")
            traffic.up += sum(record_bytes(m.content) for m in got.ok)
            traffic.client_seconds += sum(float(m.content.metric_records.get(METRICS_KEY, {}).get(
                "secagg-cpu-seconds", 0.0)) for m in got.ok)
            for node, why in got.failed.items():
                log(INFO, "%s %s: node %s dropped: %s", label, stage, node,
                    why.splitlines()[0] if why else "")
            return got

        def timed(fn, *args):
            # process time: Flower's Shamir helpers work in a thread pool, which a thread
            # clock misses (~90 % of the cost); it also counts the process's other threads
            start = time.process_time()
            try:
                return fn(*args)
            finally:
                traffic.server_seconds += time.process_time() - start

        def head(node: int, stage: str, **extra) -> ConfigRecord:
            return ConfigRecord({P.STAGE: stage, P.ROUND: rnd.server_round, P.SELF_ID: node,
                                 P.NUM_SAMPLED: len(rnd.sampled), **extra})

        # 1. keys (weighted: and each client's example count, in clear)
        got = trip("keys", {n: RecordDict({P.RECORD: head(n, "keys")}) for n in rnd.sampled})
        keys, claims = {}, {}
        for m in got.ok:
            rec = m.content.config_records.get(P.RECORD, {})
            claim = m.content.metric_records.get(METRICS_KEY, MetricRecord())
            if not all(isinstance(rec.get(k), bytes) for k in (P.PK_ENC, P.PK_MASK, P.COMMIT)):
                rnd.rejected[m.metadata.src_node_id] = "malformed key advertisement"
            elif self.weighted and (why := weight_problem(claim.get(WEIGHT_KEY))) is not None:
                rnd.rejected[m.metadata.src_node_id] = f"key advertisement: {why}"
            else:
                keys[m.metadata.src_node_id] = (rec[P.PK_ENC], rec[P.PK_MASK], rec[P.COMMIT])
                claims[m.metadata.src_node_id] = claim
        peers = timed(rnd.on_keys, keys)
        weights = capped_weights({n: claims[n] for n in rnd.keys}, weight_cap=plan.robust.weight_cap,
                                 known_sizes=plan.known_sizes) if self.weighted else {}
        # 2. shares
        requests = {}
        for node, nbrs in peers.items():
            ids = sorted(nbrs)
            requests[node] = RecordDict({P.RECORD: head(
                node, "shares", **{P.PEERS: ids, P.PK_ENC: [nbrs[i][0] for i in ids],
                                   P.PK_MASK: [nbrs[i][1] for i in ids], P.THRESHOLD: rnd.threshold})})
        got = trip("shares", requests)
        shares = {}
        for m in got.ok:
            rec = m.content.config_records.get(P.RECORD, {})
            dst, cts = list(rec.get(P.DESTINATIONS, [])), list(rec.get(P.CIPHERTEXTS, []))
            if len(dst) == len(cts) and all(isinstance(c, bytes) for c in cts):
                shares[m.metadata.src_node_id] = dict(zip((int(d) for d in dst), cts))
        inbox = timed(rnd.on_shares, shares)
        # 3. masked input (the client trains here)
        requests = {}
        top = max((weights[n] for n in inbox), default=1) if self.weighted else 1
        for node, cts in inbox.items():
            ids = sorted(cts)
            weight = {P.WEIGHT: weights[node], P.WEIGHT_MAX: top} if self.weighted else {}
            record = head(node, "masked", **{P.PEERS: ids, P.CIPHERTEXTS: [cts[i] for i in ids],
                                            P.THRESHOLD: rnd.threshold, **weight})
            requests[node] = RecordDict({**dict(train_msgs[node].content.items()), P.RECORD: record})
        got = trip("masked", requests)
        replies, undecryptable, refused = {}, {}, []
        ok = got.ok
        if plan.privacy is not None:
            ok, refused = plan.privacy.split_refusals(ok)
        accepted = {}
        for m in ok:
            node = m.metadata.src_node_id
            record = m.content.array_records.get(P.MASKED_KEY)
            if record is None or list(record.keys()) != [P.MASKED_ARRAY]:
                rnd.rejected[node] = "reply lacks the masked vector"
                continue
            try:
                vector = decode_array(record[P.MASKED_ARRAY])
            except WireError as err:
                rnd.rejected[node] = f"masked vector: {err}"
                continue
            replies[node] = vector
            traffic.update_up += payload_bytes(record)
            undecryptable[node] = list(m.content.config_records.get(P.RECORD, {}).get(P.UNDECRYPTABLE, []))
            accepted[node] = m
        plan4 = timed(rnd.on_masked, replies, undecryptable)
        for node in set(accepted) - set(rnd.masked):
            accepted.pop(node)
        rows = client_rows("train", rnd.server_round, accepted.values())
        rows += dropped_rows("train", rnd.server_round, failed=got.failed, timed_out=got.timed_out,
                             rejected=dict(rnd.rejected))
        # 4. unmask
        requests = {node: RecordDict({P.RECORD: head(node, "unmask", **{P.PEERS: s, P.DROPPED: d})})
                    for node, (s, d) in plan4.items()}
        got = trip("unmask", requests)
        reveals = {}
        for m in got.ok:
            rec = m.content.config_records.get(P.RECORD, {})
            owners, b = list(rec.get(P.SHARE_OWNERS, [])), list(rec.get(P.SHARES, []))
            k_owners, k = list(rec.get(P.KEY_OWNERS, [])), list(rec.get(P.KEY_SHARES, []))
            if len(owners) == len(b) and len(k_owners) == len(k):
                reveals[m.metadata.src_node_id] = (dict(zip(map(int, owners), b)),
                                                   dict(zip(map(int, k_owners), k)))
        total = timed(rnd.on_unmask, reveals)
        for liar, why in rnd.liars.items():
            log(WARNING, "%s: node %s %s", label, liar, why)
        log(INFO, "%s: unmasked the sum of %d update(s) (%d dropped after sharing keys)",
            label, len(rnd.masked), len(rnd.dropped))
        # the sum is of w/W-scaled updates: its weight is sum(w)/W (equal: one per input)
        weight_total = sum(weights[n] for n in rnd.masked) / top if self.weighted else None
        traffic.weight_total = sum(weights[n] for n in rnd.masked) if self.weighted else len(rnd.masked)
        return total, weight_total, list(accepted.values()), refused, rows

    def _metrics(self, rnd: SecAggRound, traffic: Traffic, *, abandoned: bool) -> dict[str, float]:
        return {
            "secagg_abandoned": float(abandoned), "secagg_abandoned_total": float(self.abandoned_total),
            "secagg_survivors": float(len(rnd.masked)), "secagg_dropped": float(len(rnd.dropped)),
            "secagg_rejected": float(len(rnd.rejected)), "secagg_liars": float(len(rnd.liars)),
            "secagg_threshold": float(rnd.threshold if rnd.sampled else 0),
            "secagg_weighted": float(self.weighted), "secagg_weight_total": float(traffic.weight_total),
            "secagg_server_cpu_seconds": traffic.server_seconds,
            "secagg_client_cpu_seconds": traffic.client_seconds / max(1, len(rnd.sampled)),
            "bytes_down": float(traffic.down), "bytes_up": float(traffic.up),
            "secagg_protocol_bytes_up": float(traffic.up - traffic.update_up),
            "clients_rejected": float(len(rnd.rejected)),
        }

    def _release(self, server_round: int, survivors: int, threshold: int) -> dict[str, float]:
        """Ledger entry for the distributed noise of the unmasked sum."""
        assert self.dp is not None
        dp = self.dp
        sampled, population = dp._pending.pop(server_round, (survivors, survivors))
        z = dp.state.noise_multiplier * math.sqrt(survivors / threshold)
        dp.state.releases.append(distributed_release(server_round, noise_multiplier=dp.state.noise_multiplier,
                                                     survivors=survivors, threshold=threshold,
                                                     sampled=sampled, population=population))
        dp.state.rounds_done = server_round
        if dp.state_path is not None:
            save_server_privacy(dp.state, dp.state_path)
        dp.last_round = {"dp_epsilon_user": dp.state.epsilon(), "dp_delta": dp.state.delta,
                         "dp_noise_multiplier": dp.state.noise_multiplier,
                         "dp_effective_noise_multiplier": z,
                         "dp_clip_norm": dp.state.clipping_norm, "dp_updates_averaged": float(survivors)}
        return dp.last_round


def distributed_release(server_round: int, *, noise_multiplier: float, survivors: int, threshold: int,
                        sampled: int, population: int) -> Release:
    """The release an unmasked sum of ``survivors`` noised inputs is: each client added
    variance (z C)^2 / threshold, so the sum carries z * sqrt(survivors / threshold)."""
    if survivors < threshold:
        raise ValueError(f"{survivors} survivors is below the threshold {threshold}; nothing is released")
    return Release(server_round, noise_multiplier * math.sqrt(survivors / threshold), sampled, population)


def capped_weights(claims: Mapping[int, Mapping], *, weight_cap: float,
                   known_sizes: Mapping[int, int] | None) -> dict[int, int]:
    """Each client's weight as plain aggregation caps it (``bound_influence``): its
    claimed ``num-examples``, at most ``weight_cap`` times the round's median claim and,
    in simulation, its partition's known train size (both only while capping is on)."""
    cap = weight_cap_of([int(c[WEIGHT_KEY]) for c in claims.values()], weight_cap)
    out = {}
    for node, claim in claims.items():
        limits = [int(claim[WEIGHT_KEY])]
        if cap is not None:
            limits.append(cap)
        if known_sizes and weight_cap > 0:
            limits.append(known_size_cap(claim, known_sizes))
        out[node] = max(1, min(limits))
    return out


def setup_secure(cfg: ExperimentConfig, strategy: Strategy) -> SecureTrain | None:
    return SecureTrain(cfg, strategy) if cfg.secure_aggregation.method != "none" else None
