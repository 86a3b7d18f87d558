"""One progress display for a run, fed by the ServerApp's streamed log lines.

``flwr run --stream`` relays the ServerApp's log; this turns its progress lines
(``[round 2/5] train: 7/10 clients done``) and round summaries (``[round 2/5] | train
loss ... | 7.1s``) into a single tqdm bar: rounds done, the phase and its clients done,
the last round's metrics, elapsed time and ETA. Lines that say something to the user
(``[fedslm] ...``, every warning and error, tracebacks, anything unrecognised) are printed
above the bar; Flower's and other libraries' routine lines are dropped. With
``verbose=true`` every line is printed as it comes and there is no bar.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from tqdm import tqdm

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's tag on lines its worker processes print: "(ClientAppActor pid=31080) ".
RAY_TAG = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s*")
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
PHASE = re.compile(r"\[round (\d+)/(\d+)\] (train|evaluate): (\d+)/(\d+) clients done")
SUMMARY = re.compile(r"\[round (\d+)/(\d+)\] \| (.*)")
# Lines from Flower and the libraries it runs that mean nothing to a FedSLM user.
ROUTINE = (
    "Using SuperLink:",
    "Successfully started run",
    "Starting logstream",
    "Starting Flower Simulation",
    "Since flwr 1.32, default simulated SuperNodes",
    "simulated SuperNodes)",
    "To change federation size",
    "flwr federation simulation-config",
    "Successfully installed",
    "Loading weights",
    "warnings.warn(",
    "configure_mappers()",
    "Warning:",
    "Manually terminating ClientAppActor",  # Flower stopping its Ray actors at the end
)


def plain(line: str) -> str:
    return ANSI.sub("", line).rstrip("\n")


class RunProgress:
    """Consumes streamed lines (``feed``); ``close`` when the stream ends."""

    def __init__(self, num_rounds: int, *, verbose: bool = False, out: TextIO | None = None) -> None:
        self.verbose = verbose
        self.out = out or sys.stdout
        self.bar: tqdm | None = None
        self.num_rounds = num_rounds
        self.phase = ""
        self.metrics = ""

    def feed(self, line: str) -> None:
        if self.verbose:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()
            return
        text = RAY_TAG.sub("", plain(line))
        body = LEVEL.sub("", text).strip()
        level = m.group(1) if (m := LEVEL.match(text)) else ""
        if match := PHASE.search(body):
            rnd, _, phase, done, total = match.groups()
            self.phase = f"round {rnd}/{self.num_rounds} {phase} {done}/{total}"
            self._show(completed=None)
        elif match := SUMMARY.search(body):
            self.metrics = match.group(3)
            self.phase = f"round {match.group(1)}/{self.num_rounds} done"
            self._show(completed=int(match.group(1)))
        elif self._shown(level, body):
            self._write(body if level in ("", "INFO") else f"{level}: {body}")

    def _shown(self, level: str, body: str) -> bool:
        if not body or any(r in body for r in ROUTINE):
            return False
        if level == "INFO":
            return body.startswith("[fedslm]")
        return True  # warnings, errors, tracebacks and anything unrecognised

    def _show(self, *, completed: int | None) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.num_rounds,
                unit="round",
                file=sys.stderr,
                mininterval=0.5,
                bar_format="{desc} |{bar:20}| {n_fmt}/{total_fmt} rounds [{elapsed}<{remaining}]{postfix}",
            )
        if completed is not None:
            self.bar.update(completed - self.bar.n)
        self.bar.set_description_str(self.phase, refresh=False)
        self.bar.set_postfix_str(self.metrics, refresh=True)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
