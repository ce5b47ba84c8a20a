"""The load: client threads drawing request kinds from the mix for a fixed time, and the thread-safe tally of
what they got."""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from benchmarks.soak.report import Report
from benchmarks.soak.requester import KINDS, Kind, Outcome, Requester
from benchmarks.soak.server import Server

PROGRESS_EVERY_S = 10.0


@dataclass
class Tally:
    """Thread-safe counts of what the requests got."""

    answers: dict[str, Counter] = field(default_factory=lambda: {k.name: Counter() for k in KINDS})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k.name: [] for k in KINDS})
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    unexpected: Counter = field(default_factory=Counter)
    server_errors: int = 0
    correct: int = 0
    incorrect: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    MAX_FAILURES_KEPT = 50

    def add(self, kind: Kind, outcome: Outcome) -> None:
        with self._lock:
            self.answers[kind.name][outcome.answer] += 1
            if outcome.status == 200 and kind.group == "valid":
                self.latencies[kind.name].append(outcome.latency_s)
            if outcome.correct is True:
                self.correct += 1
            elif outcome.correct is False:
                self.incorrect += 1
            self.server_errors += outcome.server_error
            if outcome.failure is not None:
                self.failure_count += 1
                self.unexpected[kind.name] += 1
                if len(self.failures) < self.MAX_FAILURES_KEPT:
                    self.failures.append(outcome.failure)

    def snapshot(self) -> dict[str, int]:
        """Totals for the progress line."""
        with self._lock:
            total = Counter()
            for counts in self.answers.values():
                total.update(counts)
        return {
            "requests": sum(total.values()),
            "200": total["200"],
            "503": total["503"],
            "4xx": sum(n for answer, n in total.items() if answer.startswith("4")),
            "abandoned": total["closed"] + total["reset"],
            "failures": self.failure_count,
        }


class Client(threading.Thread):
    """One load client: draws a kind, sends it, records the outcome, until ``stop`` is set."""

    def __init__(self, index: int, requester: Requester, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.requester = requester
        self.tally = tally
        self.stop = stop
        self.rng = random.Random(seed * 1000 + index)

    def run(self) -> None:
        weights = [kind.weight for kind in KINDS]
        with httpx.Client(base_url=self.requester.url, timeout=self.requester.timeout_s) as client:
            while not self.stop.is_set():
                kind = self.rng.choices(KINDS, weights)[0]
                try:
                    outcome = self.requester.send(kind, client, self.rng)
                except Exception as exc:  # a raw socket that could not connect, or anything else: counted, shown
                    outcome = Outcome(f"error: {type(exc).__name__}", failure=f"{kind.name}: {exc!r}")
                self.tally.add(kind, outcome)
                if outcome.status == 503:
                    self.stop.wait(self.rng.uniform(0.05, 0.25))


# ------------------------------------------------------------------------------------------ the load
def _progress(start: float, tally: Tally, server: Server) -> str:
    t = tally.snapshot()
    try:
        rss = f"{server.resources()['rss'] / 2**20:.0f} MiB"
    except (OSError, KeyError):
        rss = "unavailable"
    return (
        f"[{time.monotonic() - start:5.0f} s] {t['requests']} requests: {t['200']} x 200, {t['503']} x 503, "
        f"{t['4xx']} x 4xx, {t['abandoned']} abandoned; failures {t['failures']}; server RSS {rss}"
    )


def run_load(server: Server, requester: Requester, args: argparse.Namespace, report: Report) -> Tally:
    """``args.clients`` clients for ``args.duration`` seconds, with a progress line every 10 s."""
    tally = Tally()
    stop = threading.Event()
    clients = [Client(i, requester, tally, stop, args.seed) for i in range(args.clients)]
    start = time.monotonic()
    for client in clients:
        client.start()
    finished = False
    try:
        next_line = start + PROGRESS_EVERY_S
        end = start + args.duration
        while time.monotonic() < end:
            time.sleep(max(0.0, min(next_line, end) - time.monotonic()))
            if not server.alive():
                print(f"the service exited during the load (status {server.process.returncode})", flush=True)
                break
            if time.monotonic() >= next_line:
                print(_progress(start, tally, server), flush=True)
                next_line += PROGRESS_EVERY_S
        finished = True
    finally:
        stop.set()
        if finished:  # let each client finish its request; when interrupted, leave them (daemon threads)
            for client in clients:
                client.join(args.timeout + 5)
    report.load_s = time.monotonic() - start
    print(_progress(start, tally, server) + " (load stopped)", flush=True)
    return tally
