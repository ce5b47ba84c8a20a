"""Benchmarks of the segmentation service, each a stand-alone script run as ``python -m benchmarks.NAME``.

A benchmark starts the real service (``python -m service``) as a subprocess on a loopback port, drives it
with real HTTP clients, reads the process's resources from ``/proc``, and writes what it measured to
``runs/NAME/`` as JSON and as a markdown table ready for the README. ``benchmarks.soak`` is the bounded load
and soak test: a mix of valid, invalid and abandoned requests for a fixed time, with pass/fail criteria on
correctness, error statuses, memory, file descriptors and temporary files.
``python -m benchmarks`` runs the benchmark suite (:mod:`benchmarks.suite`; ``runs/bench/``, ``--quick`` to smoke-test).
"""
