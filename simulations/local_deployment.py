"""A whole deployment on one machine (127.0.0.1), for the end-to-end tests and the agent
benchmark (simulations/bench/agent_memory.py).

A ``Deployment`` makes a development PKI, starts a real ``flower-superlink`` (TLS, node
authentication, ``--database``) through ``fedslm.server.superlink``, registers node keys, starts
real agents (``python -m fedslm.client.agent``), and submits runs with ``python -m
fedslm.simulations.run federation=remote``. Every process it starts carries an environment
marker, inherited by everything Flower spawns below it (SuperExec, ServerApp, ClientApp),
so ``marked_processes`` finds what is left and ``stop_all`` ends all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fedslm.flower_tools import flower_env
from fedslm.config import DataConfig
from fedslm.data import build_federated_texts
from fedslm.pki import init_dev_pki
from fedslm.server.superlink import TlsFiles, register_node, superlink_command, superlink_env

REPO = Path(__file__).resolve().parents[1]  # the checkout whose code runs
MARK_ENV = "FEDSLM_DEPLOYMENT_MARK"
QUIET = {"PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- processes by marker

def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def marked_processes(mark: str) -> dict[int, str]:
    """Live (not zombie) processes whose environment carries ``MARK_ENV=mark``: pid -> cmd."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if _proc_state(int(entry.name)) not in ("Z", "X", ""):
            found[int(entry.name)] = cmd.strip()
    return found


def descendants(pid: int, among: dict[int, str] | None = None) -> list[int]:
    """``pid``'s live descendants (by parent links in /proc)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    children: dict[int, list[int]] = {}
    for p in pids:
        children.setdefault(_parent(p), []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if among is None or p in among]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and every descendant, children first collected then signalled."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def stop_marked(mark: str, *, grace: float = 10.0) -> None:
    """SIGTERM every marked process, then SIGKILL what is left after ``grace`` seconds."""
    for pid in marked_processes(mark):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in marked_processes(mark):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)


# ---------------------------------------------------------------- device data

def write_device_data(root: Path, num_devices: int, *, seed: int = 0) -> list[Path]:
    """One data dir per device: its share of the synthetic corpus as a .jsonl file."""
    texts = build_federated_texts(DataConfig(seed=seed), num_clients=num_devices)
    dirs = []
    for i, split in enumerate(texts.clients):
        d = root / f"device-{i + 1}-data"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "notes.jsonl", "w") as fh:
            for text in split.train + split.test:
                fh.write(json.dumps({"text": text}) + "\n")
        dirs.append(d)
    return dirs


# ---------------------------------------------------------------- a deployment

@dataclass
class Deployment:
    """One SuperLink and its agents under ``root``; ``mark`` tags every process."""

    root: Path
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    superlink: subprocess.Popen | None = None
    agents: dict[int, subprocess.Popen] = field(default_factory=dict)
    data: list[Path] = field(default_factory=list)  # each started device's data dir
    logs: list[Path] = field(default_factory=list)
    tiers: dict[int, str] = field(default_factory=dict)  # device -> its agent's --tier (kept on restart)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def env(self, **extra: str) -> dict[str, str]:
        env = flower_env(QUIET, {MARK_ENV: self.mark}, extra)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def _spawn(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs.append(log)
        with open(log, "ab") as fh:
            return subprocess.Popen(cmd, cwd=REPO, env=self.env(**env), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def init_pki(self, nodes: int) -> None:
        init_dev_pki(self.certs, ["127.0.0.1", "localhost"], nodes=nodes)

    def node_key(self, i: int) -> Path:
        return self.certs / "nodes" / f"node-{i}"

    def start_superlink(self, *, timeout: float = 60.0) -> None:
        cmd = superlink_command(tls=TlsFiles.from_dir(self.certs),
                                database=self.root / "superlink.db", port=self.port)
        self.superlink = self._spawn("superlink", cmd, **superlink_env(
            {"FLWR_HOME": str(self.root / "flwr-link")}))
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.superlink.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"https://{self.address}/health", verify=context, timeout=1).is_success:
                    return
            time.sleep(0.2)
        raise RuntimeError("flower-superlink did not become healthy")

    def register(self, i: int) -> int:
        return register_node(self.address, Path(f"{self.node_key(i)}.pub"), ca_cert=self.ca)

    def agent_command(self, i: int, data_dir: Path, *, key: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "fedslm.client.agent", "--superlink", self.address,
                "--root-certificates", str(self.ca), "--auth-key", str(key or self.node_key(i)),
                "--data-path", str(data_dir), "--state-dir", str(self.state_dir(i)),
                "--runtime-port", str(free_port()), "--device", "cpu",
                *(["--tier", self.tiers[i]] if i in self.tiers else [])]

    def state_dir(self, i: int) -> Path:
        return self.root / f"device-{i}-state"

    def start_agent(self, i: int, data_dir: Path, *, key: Path | None = None) -> subprocess.Popen:
        self.agents[i] = self._spawn(f"agent-{i}", self.agent_command(i, data_dir, key=key))
        return self.agents[i]

    def start_federation(self, devices: int, *, unregistered: int = 0) -> dict[int, int]:
        """Keys for ``devices`` (+ ``unregistered`` spare nodes), a TLS SuperLink with node
        auth, and one registered agent per device on its own data (``self.data``), all
        connected; returns the node ids."""
        self.init_pki(nodes=devices + unregistered)
        self.start_superlink()
        node_ids = {i: self.register(i) for i in range(1, devices + 1)}
        self.data = write_device_data(self.root, devices)
        for i in node_ids:
            self.start_agent(i, self.data[i - 1])
        self.wait_connected(list(node_ids))
        return node_ids

    def wait_connected(self, agents: list[int], *, timeout: float = 90.0) -> None:
        """Until each agent's SuperNode has been accepted by the SuperLink (it logs its id)."""
        deadline = time.monotonic() + timeout
        pending = set(agents)
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                log = self.root / "logs" / f"agent-{i}.log"
                if log.exists() and "SuperNode ID:" in log.read_text(errors="replace"):
                    pending.discard(i)
                elif self.agents[i].poll() is not None:
                    raise RuntimeError(f"agent {i} exited with {self.agents[i].returncode}\n"
                                       + self.tail())
            time.sleep(0.2)
        if pending:
            raise RuntimeError(f"agents {sorted(pending)} did not connect\n" + self.tail())

    def submit(self, *overrides: str, name: str = "submit") -> subprocess.Popen:
        """``python -m fedslm.simulations.run federation=remote ...`` against this SuperLink."""
        cmd = [sys.executable, "-m", "fedslm.simulations.run", "federation=remote",
               f"federation.address={self.address}", f"federation.root_certificates={self.ca}",
               f"hydra.run.dir={self.root / 'hydra' / name}", *overrides]
        return self._spawn(name, cmd)

    def serverapp_pid(self, *, timeout: float = 120.0) -> int:
        """The running ServerApp's pid (one run at a time), once the SuperLink's SuperExec
        has started it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p, cmd in marked_processes(self.mark).items() if "flwr-serverapp" in cmd]
            if found:
                return found[0]
            time.sleep(0.5)
        raise RuntimeError(f"no ServerApp started within {timeout:g}s\n" + self.tail())

    def kill_superlink_side(self) -> None:
        """A server crash: SIGKILL the SuperLink, its SuperExec and the ServerApp."""
        assert self.superlink is not None
        ours = marked_processes(self.mark)
        server = [p for p, cmd in ours.items()
                  if any(n in cmd for n in ("flower-superlink", "flwr-serverapp"))
                  or (f"--runtime-api-address 127.0.0.1:{self.port}" in cmd)]
        for pid in server:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.superlink.wait(timeout=10)

    def stop_all(self) -> None:
        """Agents first (their SuperNodes sign off while the SuperLink is still up), then
        everything else that carries the marker."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        stop_marked(self.mark)
        for proc in [self.superlink, *self.agents.values()]:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)

    def tail(self, lines: int = 40) -> str:
        """The end of every log, for assertion messages."""
        out = []
        for log in dict.fromkeys(self.logs):
            if log.exists():
                text = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)
