"""Cases per hour for a folder: ``python -m benchmarks.throughput [--cases 6] [--out runs/throughput]``.

Writes ``--cases`` full-size synthetic cases (``python -m training synth``), then segments the folder with
``python -m service.predict`` three ways on this machine, the shipped default model, no TTA:

- in process: the model loaded once in the batch command, every core for inference;
- one service: ``--url`` to one ``python -m service`` with every core;
- two services: ``--url`` to two services, the cores split between them (``BRATS_THREADS``), one case each at a
  time.

Each way's wall time (model loading and service start-up excluded for the services, which are started first)
gives cases per hour; the table goes to stdout and ``OUT/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import machine_info, usable_cores
from service.launcher import clean_env, settings_env, start_service

ROOT = Path(__file__).resolve().parents[1]


def _predict(data: Path, out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "service.predict", str(data), str(out), "--quiet", *extra], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="synthetic full-size cases to segment (default 6)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "throughput")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "MICCAI_BraTS2020_TrainingData").is_dir():
        subprocess.run([sys.executable, "-m", "training", "synth", str(data), "--cases", str(args.cases),
                        "--seed", "11", "--start-index", "701"], cwd=ROOT, check=True)
    cases = len([p for p in (data / "MICCAI_BraTS2020_TrainingData").iterdir() if p.is_dir()])
    cores = usable_cores()
    rows = []
    seconds = _predict(data, args.out / "in-process")
    rows.append({"way": "in process", "processes": 1, "threads_each": cores, "seconds": seconds})
    for processes in (1, 2):
        threads = max(1, cores // processes)
        services = [start_service(args.out / f"service-{processes}-{i}.log",
                                  env=clean_env(settings_env({"threads": threads})), timeout_s=120)
                    for i in range(processes)]
        try:
            urls = ",".join(s.url for s in services)
            seconds = _predict(data, args.out / f"services-{processes}", "--url", urls)
        finally:
            for service in services:
                service.stop()
        rows.append({"way": f"{processes} service process{'es' if processes > 1 else ''}", "processes": processes,
                     "threads_each": threads, "seconds": seconds})
    for row in rows:
        row["cases_per_hour"] = round(3600 * cases / row["seconds"], 1)
        row["seconds"] = round(row["seconds"], 1)
    machine = machine_info()
    print(f"{cases} full-size cases, {cores} usable cores, {machine['cpu'].get('model', 'CPU')}")
    print("| way | processes x threads | wall s | cases per hour |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['processes']} x {row['threads_each']} | {row['seconds']} | {row['cases_per_hour']} |")
    (args.out / "throughput.json").write_text(json.dumps({"cases": cases, "cores": cores, "machine": machine,
                                                          "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
