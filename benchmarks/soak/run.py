"""The soak run from start to end (:func:`soak`) and its command line (:func:`main`)."""

from __future__ import annotations

import argparse
import base64
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.machine import library_versions
from benchmarks.soak.load import run_load
from benchmarks.soak.payloads import Payloads, decode_mask
from benchmarks.soak.report import Report, judge, markdown, mib, percentiles, soak_machine, write_outputs
from benchmarks.soak.requester import KIND_BY_NAME, KINDS, Requester
from benchmarks.soak.server import Server, SoakError, leftovers

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_OUT = PROJECT_ROOT / "runs" / "soak"


# ------------------------------------------------------------------------------------------ the steps of the run
def _settle_fds(server: Server, ceiling: int | None, wait_s: float = 5.0) -> dict[str, int]:
    """The server's resources once the client connections just closed have gone from its side too: read
    after a second, then again (up to ``wait_s``) while the FD count is above ``ceiling``."""
    time.sleep(1.0)
    resources = server.resources()
    deadline = time.monotonic() + wait_s
    while ceiling is not None and resources["fds"] > ceiling and time.monotonic() < deadline:
        time.sleep(0.25)
        resources = server.resources()
    return resources


def _warm_up(requester: Requester, count: int) -> None:
    """``count`` valid requests of every form, then one of each invalid kind, one after the other."""
    valid = [k for k in KINDS if k.group == "valid"]
    invalid = [k for k in KINDS if k.group == "invalid"]
    rng = random.Random(0)
    with httpx.Client(base_url=requester.url, timeout=requester.timeout_s) as client:
        for kind in [valid[i % len(valid)] for i in range(count)] + invalid:
            outcome = requester.send(kind, client, rng)
            if outcome.failure is not None:
                raise SoakError(f"warm-up request failed on the idle service: {outcome.failure}")


def _reference(server: Server, payloads: Payloads, timeout_s: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The mask of one valid request on the idle service, and what it says about it."""
    start = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=timeout_s) as client:
        response = client.post("/segment", files=payloads.parts())
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise SoakError(f"the reference request got {response.status_code}: {response.text[:500]}")
    body = response.json()
    labels = decode_mask(base64.b64decode(body["mask"]))
    if labels.shape != payloads.shape:
        raise SoakError(f"the reference mask has shape {labels.shape}, the scan {payloads.shape}")
    values, counts = np.unique(labels, return_counts=True)
    card = next((m for m in httpx.get(server.url + "/models", timeout=10.0).json().get("models", [])
                 if m.get("name") == body.get("model")), {})
    return labels, {
        "model": body.get("model"),
        "model_sha256": body.get("model_sha256"),
        "provider": body.get("provider"),
        "backend": card.get("backend"),
        "device": card.get("device"),
        "precision": card.get("precision"),
        "latency_s": latency,
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts)},
    }


def _drain(server: Server, timeout_s: float) -> dict[str, Any]:
    """Wait until no inference runs or waits; returns the time it took and the last reading."""
    start = time.monotonic()
    running = waiting = float("nan")
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        while True:
            running, waiting = server.inference_load(client)
            if running == 0 and waiting == 0:
                return {"drained": True, "seconds": time.monotonic() - start, "running": 0, "waiting": 0}
            if time.monotonic() - start > timeout_s:
                return {"drained": False, "seconds": time.monotonic() - start, "running": running,
                        "waiting": waiting}
            time.sleep(0.25)


# ------------------------------------------------------------------------------------------ the command line
def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 64,64,48, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise argparse.ArgumentTypeError(f"expected three sizes of at least 8 voxels like 64,64,48, got {text!r}")
    return shape  # type: ignore[return-value]


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Bounded load and soak test: start the service on a loopback port, send it a mix of valid, "
        "invalid and abandoned requests from several clients for a fixed time, and check the answers, the "
        "masks, the memory, the file descriptors and the temporary folder. Exit status 0 when every criterion "
        "passes, 1 when one fails, 2 when the run could not be made.",
    )
    add = parser.add_argument
    add("--duration", type=_positive(float), default=180.0,
        help="seconds of load (default %(default)s; start-up, warm-up and the end checks come on top)")
    add("--clients", type=_positive(int), default=6,
        help="concurrent clients (default %(default)s); above max-concurrent + max-queue some get 503")
    add("--max-concurrent", type=_positive(int), default=1, help="BRATS_MAX_CONCURRENT (default %(default)s)")
    add("--max-queue", type=int, default=2, help="BRATS_MAX_QUEUE (default %(default)s)")
    add("--threads", type=_positive(int), default=None,
        help="BRATS_THREADS (inference threads per model); default: the backend's own")
    add("--backend", choices=("auto", "onnxruntime", "openvino"), default=None,
        help="BRATS_BACKEND; default: the service's (auto). GPUs are never used: ONNX Runtime is limited to its "
        "CPU provider")
    add("--precision", choices=("auto", "fp32", "bf16"), default=None,
        help="BRATS_PRECISION; default: the service's (auto)")
    add("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
        help="folder of NAME.onnx + NAME.json models the service loads (default: the shipped models/)")
    add("--shape", type=_shape, default=(64, 64, 48), help="size of the synthetic scan, X,Y,Z (default 64,64,48)")
    add("--seed", type=int, default=0, help="seed of the scan and of the request mix (default %(default)s)")
    add("--warmup", type=_positive(int), default=5,
        help="valid requests before the warm-up memory and FD reading (default %(default)s)")
    add("--timeout", type=_positive(float), default=120.0,
        help="longest wait for one answer, s (default %(default)s)")
    add("--drain-timeout", type=_positive(float), default=60.0,
        help="longest wait, after the load, for no inference to run or wait, s (default %(default)s)")
    add("--start-timeout", type=_positive(float), default=120.0,
        help="longest wait for the service to be ready, s (default %(default)s)")
    add("--out", type=Path, default=DEFAULT_OUT,
        help="folder for soak.json, soak.md and server.log (default runs/soak/)")
    args = parser.parse_args(argv)
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if not args.models_dir.is_dir():
        parser.error(f"--models-dir {args.models_dir} is not a folder")
    return args


# ------------------------------------------------------------------------------------------ the run
def _interrupt(signum, frame) -> None:  # SIGTERM behaves like Ctrl-C: the finally blocks stop the server
    raise KeyboardInterrupt


def soak(args: argparse.Namespace, argv: Sequence[str]) -> Report:
    """Make the run (described in :mod:`benchmarks.soak`). Whatever happens, the server is stopped, its log
    copied to ``args.out/server.log`` and the work folder removed."""
    report = Report(
        command=shlex.join(["python", "-m", "benchmarks.soak", *argv]),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={
            "duration_s": args.duration, "clients": args.clients, "max_concurrent": args.max_concurrent,
            "max_queue": args.max_queue, "threads": args.threads, "backend": args.backend,
            "precision": args.precision, "models_dir": str(args.models_dir),
            "shape": list(args.shape), "seed": args.seed, "warmup": args.warmup, "timeout_s": args.timeout,
            "drain_timeout_s": args.drain_timeout,
            "mix": {k.name: k.weight for k in KINDS},
        },
        machine=soak_machine(),
        libraries=library_versions(),
    )
    workdir = Path(tempfile.mkdtemp(prefix="brats-soak-"))
    server: Server | None = None
    try:
        payloads = Payloads.build(workdir / "inputs", args.shape, args.seed)
        settings = {"BRATS_MAX_CONCURRENT": str(args.max_concurrent), "BRATS_MAX_QUEUE": str(args.max_queue)}
        for name, value in (("THREADS", args.threads), ("BACKEND", args.backend), ("PRECISION", args.precision)):
            if value is not None:
                settings[f"BRATS_{name}"] = str(value)
        server = Server(workdir, args.models_dir, settings)
        print(f"starting the service on {server.url} (models {args.models_dir}, upload folder {server.spool})",
              flush=True)
        server.start(args.start_timeout)
        reference, report.reference = _reference(server, payloads, args.timeout)
        print(f"reference mask: model {report.reference['model']} on {report.reference['provider']} "
              f"({report.reference['precision']}), {report.reference['latency_s']:.2f} s, "
              f"label voxels {report.reference['label_voxels']}", flush=True)
        abandon_delay = max(0.2, 1.5 * report.reference["latency_s"])
        report.settings["abandon_delay_max_s"] = abandon_delay
        requester = Requester(server.url, payloads, reference=reference, abandon_delay_s=abandon_delay,
                              timeout_s=args.timeout)
        _warm_up(requester, args.warmup)
        report.resources["warm_up"] = _settle_fds(server, None)
        print(f"warm-up done: RSS {mib(report.resources['warm_up']['rss'])} MiB, "
              f"{report.resources['warm_up']['fds']} open FDs; load for {args.duration:.0f} s with "
              f"{args.clients} clients", flush=True)

        tally = run_load(server, requester, args, report)
        report.answers = {name: dict(counts) for name, counts in tally.answers.items()}
        report.latency_s = {name: percentiles(v) for name, v in tally.latencies.items()
                            if KIND_BY_NAME[name].group == "valid"}
        report.latency_s["all valid"] = percentiles([x for v in tally.latencies.values() for x in v])
        report.correct_200, report.incorrect_200 = tally.correct, tally.incorrect
        report.server_errors, report.unexpected = tally.server_errors, tally.failure_count
        report.failures = list(tally.failures)
        report.unexpected_by_kind = dict(tally.unexpected)

        if server.alive():
            report.drain = _drain(server, args.drain_timeout)
            report.final_request = _final_request(requester, args.timeout)
            report.resources["end"] = _settle_fds(server, report.resources["warm_up"]["fds"])
            report.server_statuses = server.segment_statuses()
        else:
            report.drain = {"drained": False, "seconds": 0.0, "running": "service gone", "waiting": "service gone"}
            report.final_request = "the service had exited"
        report.leftovers = leftovers(server.spool)
        return report
    finally:
        if server is not None:
            stop_started = time.monotonic()
            status = server.stop()
            report.server_stop = {"exit_status": status, "killed": server.killed,
                                  "seconds": round(time.monotonic() - stop_started, 2)}
            report.settings["server_command"] = shlex.join(server.command)
            if server.log_path.exists():
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log_path, args.out / "server.log")
        shutil.rmtree(workdir, ignore_errors=True)


def _final_request(requester: Requester, timeout_s: float) -> str:
    """One valid request after the load: ``"200, identical"`` when it is served with the reference mask."""
    with httpx.Client(base_url=requester.url, timeout=timeout_s) as client:
        outcome = requester.send(KIND_BY_NAME["valid_3d_json"], client, random.Random(0))
    if outcome.failure is None and outcome.correct:
        return "200, identical"
    return outcome.failure or f"{outcome.answer}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        report = soak(args, argv)
    except KeyboardInterrupt:
        print(f"interrupted: the service was stopped; only {args.out / 'server.log'} was written", file=sys.stderr)
        return 130
    except SoakError as exc:
        print(f"python -m benchmarks.soak: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    judge(report)
    report.wall_s = round(time.monotonic() - started, 1)
    report.machine["load_average_at_end"] = os.getloadavg()[0]
    out = args.out
    write_outputs(report, out)
    print()
    print(markdown(report))
    if report.failures:
        print("First unexpected answers:")
        for failure in report.failures[:10]:
            print(f"  - {failure}")
    print(f"written: {out / 'soak.json'}, {out / 'soak.md'}, {out / 'server.log'}")
    return 0 if report.passed else 1
