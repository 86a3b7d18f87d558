"""The work behind the ClientApp's SecAgg+ handlers: read the stage's record, run the
plain stage function of ``fedslm.client.secagg``, keep the round state, pack the reply.

The round state (fresh secrets, neighbours' public keys, shares held) lives in the
client's state dir (``secagg_<run>.json``, mode 0600, written atomically) only between
the stages of one round: any SuperNode may serve a simulated client's next stage, and a
device keeps nothing in memory between messages. It is deleted after the unmask stage
and overwritten by the next round's key stage; a round that was abandoned leaves at
most one such file, whose secrets belong to a round that never released a sum.

Only stage 3 (and stage 1 of a weighted round, which counts the client's examples)
imports torch, transformers and PEFT: on a device, where each message is its own
``flwr-clientapp`` process, the other stages are a few hundred milliseconds of crypto.

Stage 3 trains exactly as the plain train handler does (``fedslm.client.task.fit``), then
sends only the masked ring vector and its metrics. In a weighted round
(``fedslm.secagg.protocol.weighted``) stage 1 also sends the client's example count
(as plain FedAvg's reply does) and stage 3 scales the update by the w/W the server
returns.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedslm.client import secagg
from fedslm.client.node import record_participation, this_node
from fedslm.client.privacy import BudgetExhausted
from fedslm.keys import BUDGET_EXHAUSTED, PARTITION_ID, STATUS_KEY, STATUS_RECORD, WEIGHT_KEY
from fedslm.atomic import atomic_write
from fedslm.config import ExperimentConfig
from fedslm.secagg import protocol as P
from fedslm.secagg.crypto import Secrets


def state_path(state_dir: Path, run_id: int) -> Path:
    return state_dir / f"secagg_{run_id}.json"


def _save(path: Path, state: secagg.ClientRound) -> None:
    atomic_write(path, lambda fh: fh.write(state.to_json().encode()))


def _load(path: Path, server_round: int, self_id: int) -> secagg.ClientRound:
    if not path.exists():
        raise secagg.ProtocolAbort(f"no SecAgg state for round {server_round}: keys were never advertised")
    state = secagg.ClientRound.from_json(path.read_text())
    if (state.server_round, state.self_id) != (server_round, self_id):
        raise secagg.ProtocolAbort(f"SecAgg state is for round {state.server_round}, asked about {server_round}")
    return state


def _reply(msg: Message, started: float, records: dict) -> Message:
    metrics = records.pop("metrics", {})
    metrics["secagg-cpu-seconds"] = time.process_time() - started
    return Message(RecordDict({**records, "metrics": MetricRecord(metrics)}), reply_to=msg)


def stage_reply(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    """One SecAgg+ stage for this client (the stage is named in the ``secagg`` record)."""
    started = time.process_time()
    rec, me = msg.content[P.RECORD], this_node(cfg, context, msg)
    stage, rnd, self_id = str(rec[P.STAGE]), int(rec[P.ROUND]), int(rec[P.SELF_ID])
    path = state_path(me.state_dir, context.run_id)
    if stage == "keys":
        state, adv = secagg.advertise_keys(rnd, self_id)
        _save(path, state)
        claim = {}
        if P.weighted(cfg):  # the weight the server caps, in clear (as plain FedAvg's)
            from fedslm.client.task import train_examples  # tokenizes: torch, transformers

            claim = {WEIGHT_KEY: train_examples(cfg, me.partition_id, me.data_path),
                     PARTITION_ID: me.partition_id}
        return _reply(msg, started, {P.RECORD: ConfigRecord({P.PK_ENC: adv["pk-enc"], P.PK_MASK: adv["pk-mask"],
                                                               P.COMMIT: adv["commit"]}),
                                     "metrics": claim})
    state = _load(path, rnd, self_id)
    if stage == "shares":
        peers = {int(i): (e, m) for i, e, m in zip(rec[P.PEERS], rec[P.PK_ENC], rec[P.PK_MASK], strict=True)}
        expected = P.threshold(cfg.secure_aggregation, int(rec[P.NUM_SAMPLED]))
        cts = secagg.share_keys(state, peers, threshold=int(rec[P.THRESHOLD]), expected_threshold=expected)
        _save(path, state)
        ids = sorted(cts)
        record = ConfigRecord({P.DESTINATIONS: ids, P.CIPHERTEXTS: [cts[i] for i in ids]})
        return _reply(msg, started, {P.RECORD: record})
    if stage == "masked":
        return _masked(cfg, msg, context, state, path, started, me)
    if stage == "unmask":
        b, keys = secagg.reveal(state, [int(i) for i in rec.get(P.PEERS, [])],
                                [int(i) for i in rec.get(P.DROPPED, [])])
        path.unlink(missing_ok=True)
        return _reply(msg, started, {P.RECORD: ConfigRecord({
            P.SHARE_OWNERS: list(b), P.SHARES: list(b.values()),
            P.KEY_OWNERS: list(keys), P.KEY_SHARES: list(keys.values())})})
    raise secagg.ProtocolAbort(f"unknown SecAgg stage {stage!r}")


def _masked(cfg, msg, context, state, path, started, me) -> Message:
    from fedslm.adapters import from_array_record  # the one stage that trains: torch and the rest
    from fedslm.client.handlers import use_threads
    from fedslm.client.task import fit

    use_threads(int(cfg.federation.client_num_cpus))
    rec, sa, config = msg.content[P.RECORD], cfg.secure_aggregation, msg.content["config"]
    senders = [int(i) for i in rec.get(P.PEERS, [])]
    bad = secagg.receive_shares(state, dict(zip(senders, rec.get(P.CIPHERTEXTS, []), strict=True)))
    if secagg.simulated_dropout(sa.simulate_dropout, state.server_round, me.partition_id):
        path.unlink(missing_ok=True)  # it leaves the round for good
        raise RuntimeError("simulated dropout (secure_aggregation.simulate_dropout)")
    _save(path, state)
    received = from_array_record(msg.content["arrays"])
    train_started = time.process_time()
    try:
        arrays, metrics = fit(cfg, received, partition_id=me.partition_id, server_round=state.server_round,
                              proximal_mu=float(config.get("proximal-mu", 0.0)),
                              client_dir=me.state_dir, data_path=me.data_path)
    except BudgetExhausted as exc:  # a status instead of an input: the server recovers its masks
        status = ConfigRecord({STATUS_KEY: BUDGET_EXHAUSTED, "message": str(exc)})
        return Message(RecordDict({"metrics": MetricRecord(exc.metrics), STATUS_RECORD: status}), reply_to=msg)
    trained = time.process_time() - train_started
    record_participation(me.participation_log, run_id=context.run_id, server_round=state.server_round,
                         phase="train", metrics=metrics)
    update = [np.asarray(arrays[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
              for k in msg.content["arrays"].keys()]
    p = cfg.privacy
    dp = p.user_level
    std = secagg.noise_std(noise_multiplier=p.user_level_noise(), clipping_norm=p.clipping_norm,
                           threshold=state.threshold) if dp else 0.0
    rng = np.random.default_rng(np.frombuffer(Secrets.from_entropy(state.entropy).local_seed, dtype=np.uint64))
    scale = secagg.weight_scale(rec.get(P.WEIGHT), rec.get(P.WEIGHT_MAX)) if P.weighted(cfg) else 1.0
    values, clipped = secagg.prepare_update(update, sa=sa, clip_norm=p.clipping_norm if dp else 0.0,
                                            noise_std=std, rng=rng, scale=scale)
    masked = secagg.mask(state, values, modulus_bits=sa.modulus_bits)
    wire = masked.astype(np.uint32 if sa.modulus_bits <= 32 else np.uint64)
    metrics = {**metrics, "secagg-undecryptable": len(bad)}
    if dp:
        metrics["dp-clipped"] = int(clipped)
    reply = _reply(msg, started + trained, {
        P.MASKED_KEY: ArrayRecord({P.MASKED_ARRAY: Array(wire)}),
        P.RECORD: ConfigRecord({P.UNDECRYPTABLE: bad} if bad else {}), "metrics": metrics})
    return reply
