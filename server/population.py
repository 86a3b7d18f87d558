"""A large population of virtual clients served by a few simulated SuperNodes.

Flower 1.41's simulation engine registers one SuperNode per client and, ten times a
second, asks its in-memory state for messages for *every* registered node, each ask
scanning every stored message (``vce_api.add_messages_to_queue`` /
``InMemoryLinkState.get_message_ins``). Its cost, and a round's time with it, grows with
the clients registered, not the clients sampled: with 10 sampled, the simulation
process spent 0.3, 0.8 and 2.9 CPU-s per round at 100, 1,000 and 10,000 clients, and a
round took 3.6 s at 100 and 5.7 s (16 s on a busier machine) at 10,000 on 2 cores
(``python -m fedslm.simulations.bench scale``); start-up took 75 s instead of 23 s.

With ``federation.supernodes = k > 0`` the engine runs k SuperNodes and this grid shows
the strategy all ``num_clients`` clients as virtual node ids ``1..num_clients`` (client
``i`` is partition ``i - 1``). The strategy samples among them as usual; each message
for a sampled client goes to a SuperNode with the client's partition id in its config
record, and the reply comes back under the client's virtual id, so the round loop,
screening, per-client rows and strategies see the population, not the workers. Clients
keep per-partition state on disk (never in node context), so which SuperNode serves a
client does not matter.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedslm.keys import CONFIG_KEY

if TYPE_CHECKING:
    from flwr.supercore.run import Run

PARTITION_KEY = "partition-id"


class PopulationGrid(Grid):
    """``population`` virtual clients on the SuperNodes of ``grid`` (see module docstring)."""

    def __init__(self, grid: Grid, population: int) -> None:
        if population < 1:
            raise ValueError(f"population must be >= 1, got {population}")
        self._grid = grid
        self.population = population
        self._virtual_of: dict[str, int] = {}  # pushed message id -> virtual node id
        self._next = 0  # round-robin over the SuperNodes

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.population + 1)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message to a SuperNode, carrying its virtual client's partition id."""
        workers = sorted(self._grid.get_node_ids())
        if not workers:
            raise RuntimeError("no SuperNode is connected to serve the virtual clients")
        routed, virtual = [], []
        for msg in messages:
            client = msg.metadata.dst_node_id
            if not 1 <= client <= self.population:
                raise ValueError(f"node {client} is not a virtual client (1..{self.population})")
            routed.append(Message(with_partition(msg.content, client - 1),
                                  dst_node_id=workers[self._next % len(workers)],
                                  message_type=msg.metadata.message_type,
                                  ttl=msg.metadata.ttl, group_id=msg.metadata.group_id))
            self._next += 1
            virtual.append(client)
        ids = list(self._grid.push_messages(routed))
        self._virtual_of.update(zip(ids, virtual))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies, re-addressed as coming from the virtual client that was asked."""
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            client = self._virtual_of.pop(reply.metadata.reply_to_message_id, None)
            if client is not None:
                reply.metadata.__dict__["_src_node_id"] = client  # Metadata has no setter
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(list(pending)))
            pending -= {m.metadata.reply_to_message_id for m in got}
            replies += got
            if pending:
                time.sleep(0.1)
        return replies


def with_partition(content: RecordDict, partition_id: int) -> RecordDict:
    """``content`` with ``partition-id`` added to its config record (records shared, the
    config record copied: strategies send one RecordDict to every node)."""
    config = ConfigRecord(dict(content.config_records.get(CONFIG_KEY, {})))
    config[PARTITION_KEY] = partition_id
    return RecordDict({**{k: v for k, v in content.items() if k != CONFIG_KEY}, CONFIG_KEY: config})


def population_grid(grid: Grid, *, num_clients: int, supernodes: int, engine: str) -> Grid:
    """The grid the strategy sees: ``num_clients`` virtual clients on a few SuperNodes when
    ``federation.supernodes`` asks for it, or when a simulation was started with a different
    number of SuperNodes than clients (``flwr run .`` uses Flower's own local simulation
    settings, 2 SuperNodes in 1.41, whatever the app's config says): then the run adapts and
    says so in one line, instead of training 2 of 10 clients."""
    if supernodes > 0:
        return PopulationGrid(grid, num_clients)
    if engine != "simulation":
        return grid  # real devices connect over time; the strategy waits for them
    nodes = registered_nodes(grid)
    if nodes in (0, num_clients):
        return grid
    from logging import INFO

    from flwr.common import log

    log(INFO, "[fedslm] federation.num_clients=%d on %d simulated SuperNodes: serving all %d clients "
        "from them (as with federation.supernodes=%d)", num_clients, nodes, num_clients, nodes)
    return PopulationGrid(grid, num_clients)


def registered_nodes(grid: Grid, *, settle: float = 10.0, poll: float = 0.2) -> int:
    """How many SuperNodes the simulation registered. Flower starts the ServerApp thread
    before it registers the nodes (all at once), so wait for a non-zero count that holds
    for one more poll; 0 if none appear within ``settle`` seconds."""
    deadline = time.monotonic() + settle
    last = -1
    while True:
        count = len(list(grid.get_node_ids()))
        if count > 0 and count == last:
            return count
        if time.monotonic() >= deadline:
            return count
        last = count
        time.sleep(poll)
