"""The device agent: one command that turns a device into a FedSLM client.

    python -m fedslm.client.agent --superlink superlink.lan:9093 --root-certificates ca.crt \\
        --auth-key /var/lib/fedslm/node-key --data-path ~/notes --state-dir /var/lib/fedslm

It checks everything it can before connecting (the data is readable and has texts, the
node key is a usable EC key, the CA certificate verifies the SuperLink's TLS certificate)
and refuses to start with one line on stderr otherwise. Then it runs a real
``flower-supernode`` over TLS with node authentication; the SuperNode starts our
ClientApp for each message, which trains only on ``--data-path`` and keeps its state in
``--state-dir`` (client/node.py), across runs and restarts of the device.

The state dir holds: ``node-config.toml`` (what the ClientApp is told), ``agent.json``
(this node's public key and SuperLink), ``flwr/`` (Flower's own files: installed app
bundles), ``participation.jsonl`` and whatever the personal adapter and privacy ledger
keep. The private key and the data never leave the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedslm.flower_tools import flower_bin, flower_env
from fedslm.pki import PkiError, load_ca_certificate, load_node_private_key, openssh_public_key

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
PROBE_SECONDS = 5.0
STOP_GRACE_SECONDS = 5.0
# Flower's SuperNode prints this when the SuperLink will not activate the node's key.
NOT_ACCEPTED = "Failed to activate SuperNode"
RETRY_SECONDS = 10.0
AGENT_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # devices have no internet
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


class AgentError(RuntimeError):
    """The agent cannot start; the one-line message names the flag and the problem."""


@dataclass(frozen=True)
class AgentConfig:
    superlink: str
    root_certificates: Path
    auth_key: Path
    data_path: Path
    state_dir: Path
    runtime_port: int = 9094
    max_wait_time: float = 0.0  # 0: keep retrying the SuperLink forever
    task: str = "causal_lm"  # the format --data-path is checked in (fedslm.tasks)
    device: str = "auto"  # training.device for this node's ClientApps
    tier: str = ""  # the device tier peft.ranks may give a rank to ("" = none)


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="fedslm-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    parser.add_argument("--root-certificates", required=True, type=Path,
                        help="CA certificate (PEM) that signed the SuperLink's certificate")
    parser.add_argument("--auth-key", required=True, type=Path,
                        help="this node's private key (python -m fedslm.pki node-key PATH)")
    parser.add_argument("--task", default="causal_lm", choices=("causal_lm", "instruct", "classify"),
                        help="the task whose record format --data-path holds (default: causal_lm: "
                             "text; instruct: instruction/output or chat messages; classify: text "
                             "and label columns)")
    parser.add_argument("--data-path", required=True, type=Path,
                        help="directory (or file) of .txt/.jsonl/.csv/.parquet texts to train on")
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="where the node keeps its state across runs and restarts")
    parser.add_argument("--runtime-port", type=int, default=9094,
                        help="local port of the SuperNode's ClientApp API (127.0.0.1)")
    parser.add_argument("--max-wait-time", type=float, default=0.0,
                        help="give up after this many seconds without being accepted by the "
                             "SuperLink (0: keep trying)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where this device trains and evaluates (overrides the run's "
                             "training.device; auto: cuda when available, else cpu)")
    parser.add_argument("--tier", default="",
                        help="this device's tier (node config 'tier'), which a run's peft.ranks "
                             "can map to a LoRA rank: 'tier=small r=4, tier=large r=16'")
    a = parser.parse_args(argv)
    if a.tier and not re.fullmatch(r"[A-Za-z0-9_.-]+", a.tier):
        parser.error(f"--tier: {a.tier!r} must be letters, digits, '_', '.' or '-'")
    return AgentConfig(superlink=a.superlink, root_certificates=a.root_certificates.expanduser(),
                       auth_key=a.auth_key.expanduser(), data_path=a.data_path.expanduser(),
                       state_dir=a.state_dir.expanduser(), runtime_port=a.runtime_port,
                       max_wait_time=a.max_wait_time, task=a.task, device=a.device, tier=a.tier)


# ---------------------------------------------------------------- checks

def check_data(path: Path, task: str = "causal_lm") -> int:
    """Number of texts under ``path``; AgentError if it is empty or unreadable.

    Runs the reader (fedslm.data.local, the ClientApp's own) in a child process, so the
    agent does not keep pandas and datasets in memory for the life of the device.
    """
    done = subprocess.run([sys.executable, "-m", "fedslm.data.local", str(path), "--task", task],
                          capture_output=True, text=True, env=flower_env(AGENT_ENV),
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise AgentError(f"--data-path: {lines[-1].removeprefix('data-path: ')}")
    return int(done.stdout.strip())


def check_device(name: str) -> str:
    """The torch device ``--device`` resolves to here (in a child process, like
    ``check_data``: the agent itself never imports torch). ``cpu`` is there on every
    machine: no child process (its torch import is ~1.4 CPU-s of each agent start)."""
    if name == "cpu":
        return "cpu"
    done = subprocess.run([sys.executable, "-m", "fedslm.device", name], capture_output=True,
                          text=True, env=flower_env(AGENT_ENV),
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise AgentError(f"--device: {lines[-1].removeprefix('training.device: ')}")
    return done.stdout.strip()


def check_key(path: Path) -> bytes:
    """The node's OpenSSH public key, from its private key file."""
    try:
        return openssh_public_key(load_node_private_key(path))
    except PkiError as err:
        raise AgentError(f"--auth-key: {err}") from None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AgentError(f"--superlink: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def check_certificate(address: str, ca_path: Path, *, timeout: float = PROBE_SECONDS) -> bool:
    """Verify the SuperLink's TLS certificate against the CA now, if it is reachable.

    Returns False when it is not reachable yet (the SuperNode keeps retrying); raises
    AgentError when it answers with a certificate the CA did not sign, or without TLS.
    """
    try:
        load_ca_certificate(ca_path)
    except PkiError as err:
        raise AgentError(f"--root-certificates: {err}") from None
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as err:
        raise AgentError(f"--root-certificates: {ca_path} does not verify the certificate of "
                         f"the SuperLink at {address} ({err.verify_message})") from None
    except ssl.SSLError as err:
        raise AgentError(f"--superlink: TLS handshake with {address} failed ({err.reason}); "
                         "the agent only connects over TLS") from None
    except OSError:
        return False


def prepare_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = state_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise AgentError(f"--state-dir: {state_dir} is not writable ({err.strerror})") from None


def check_inputs(cfg: AgentConfig) -> dict:
    """Every check that can fail before connecting; returns what the agent reports."""
    texts = check_data(cfg.data_path, cfg.task)
    device = check_device(cfg.device)
    public_key = check_key(cfg.auth_key)
    prepare_state_dir(cfg.state_dir)
    reachable = check_certificate(cfg.superlink, cfg.root_certificates)
    return {"texts": texts, "device": device, "public_key": public_key.decode(),
            "superlink_reachable": reachable}


# ---------------------------------------------------------------- the SuperNode

def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_node_config(cfg: AgentConfig) -> Path:
    """The node config every ClientApp of this node receives (a file: any path works)."""
    path = cfg.state_dir / "node-config.toml"
    path.write_text(f'"data-path" = {toml_string(str(cfg.data_path.resolve()))}\n'
                    f'"state-dir" = {toml_string(str(cfg.state_dir.resolve()))}\n'
                    f'"device" = {toml_string(cfg.device)}\n'
                    + (f'"tier" = {toml_string(cfg.tier)}\n' if cfg.tier else ""))
    return path


def supernode_command(cfg: AgentConfig, node_config: Path) -> list[str]:
    cmd = [flower_bin("flower-supernode"),
           "--superlink", cfg.superlink,
           "--root-certificates", str(cfg.root_certificates.resolve()),
           "--auth-supernode-private-key", str(cfg.auth_key.resolve()),
           "--node-config", str(node_config),
           "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(cfg.runtime_port)]
    if cfg.max_wait_time > 0:
        cmd += ["--max-wait-time", str(cfg.max_wait_time)]
    return cmd


def supernode_env(cfg: AgentConfig) -> dict[str, str]:
    """Offline, quiet, and Flower's files (app bundles the SuperLink sends) in the state dir."""
    return flower_env(AGENT_ENV, {"FLWR_HOME": str((cfg.state_dir / "flwr").resolve())})


def _relay(stream, seen: dict[str, bool]) -> None:
    for line in iter(stream.readline, ""):
        if NOT_ACCEPTED in line:
            seen["not_accepted"] = True
        sys.stdout.write(line)
        sys.stdout.flush()


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count as alive there)
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def end_group(process: subprocess.Popen, *, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the SuperNode's process group (SuperNode, SuperExec, ClientApps); SIGKILL
    whatever is still there after ``grace`` seconds. The SuperNode signs off on SIGTERM."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process.poll() is not None and not group_alive(process.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


class SuperNodeRunner:
    """Runs flower-supernode, restarting it while the SuperLink does not accept the node.

    Flower refuses to activate a node whose key is not registered, and also one it still
    counts as online: after a crash, until two heartbeats (60 s) are missed. A rebooted
    device therefore retries every ``RETRY_SECONDS`` until ``--max-wait-time``.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.process: subprocess.Popen | None = None
        self.stopping = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, _frame: object) -> None:
        """Ask the SuperNode to sign off; the main loop sees it exit. A SuperNode that
        hangs is killed after the grace period."""
        self.stopping = True
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

            def force() -> None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

            timer = threading.Timer(STOP_GRACE_SECONDS, force)
            timer.daemon = True
            timer.start()

    def run_once(self, node_config: Path) -> tuple[int, bool]:
        """(exit code, whether the SuperLink refused to activate the node)."""
        self.process = subprocess.Popen(
            supernode_command(self.cfg, node_config), env=supernode_env(self.cfg),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True)
        seen = {"not_accepted": False}
        relay = threading.Thread(target=_relay, args=(self.process.stdout, seen), daemon=True)
        relay.start()
        code = self.process.wait()
        relay.join(timeout=5)
        end_group(self.process)  # its SuperExec and any ClientApp it left behind
        return code, seen["not_accepted"]

    def run(self, public_key: str) -> int:
        cfg = self.cfg
        node_config = write_node_config(cfg)
        (cfg.state_dir / "agent.json").write_text(json.dumps({
            "superlink": cfg.superlink, "public_key": public_key,
            "data_path": str(cfg.data_path.resolve()), "started_at": time.time()}, indent=2))
        started = time.monotonic()
        while not self.stopping:
            code, not_accepted = self.run_once(node_config)
            if self.stopping:
                return 0
            if not not_accepted:
                return code
            if cfg.max_wait_time and time.monotonic() - started + RETRY_SECONDS > cfg.max_wait_time:
                raise AgentError(
                    f"--auth-key: the SuperLink at {cfg.superlink} refused this node: its public "
                    f"key ({cfg.auth_key}.pub) is not registered there (python -m "
                    "fedslm.server.superlink register ...), or it still counts this node online after "
                    "a crash (for two missed heartbeats, 60 s)")
            print(f"[fedslm-agent] the SuperLink did not accept this node (not registered, or "
                  f"still online from before a restart); retrying in {RETRY_SECONDS:.0f}s",
                  flush=True)
            deadline = time.monotonic() + RETRY_SECONDS
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.2)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["generate"]:  # the device's personal model, offline (client/generate.py)
        from fedslm.client.generate import main as generate

        return generate(args[1:])
    cfg = parse_args(argv)
    try:
        facts = check_inputs(cfg)
        print(f"[fedslm-agent] data: {facts['texts']} texts under {cfg.data_path}", flush=True)
        print(f"[fedslm-agent] device: {facts['device']} (--device {cfg.device})", flush=True)
        print(f"[fedslm-agent] node public key: {facts['public_key']}", flush=True)
        if not facts["superlink_reachable"]:
            print(f"[fedslm-agent] SuperLink {cfg.superlink} not reachable yet; "
                  "the SuperNode will keep trying", flush=True)
        return SuperNodeRunner(cfg).run(facts["public_key"])
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED if "refused this node" in str(err) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
