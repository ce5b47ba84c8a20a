"""Bounded load and soak test of the segmentation service: ``python -m benchmarks.soak [options]``.

The script starts a real ``python -m service`` on a free loopback port: on the CPU (ONNX Runtime is limited
to its CPU provider, and the service's ``auto`` backend then picks OpenVINO where it is installed), with its
own temporary upload folder, ``BRATS_MAX_CONCURRENT=1`` and ``BRATS_MAX_QUEUE=2`` by default. Then it runs
``--clients`` threads for ``--duration`` seconds. Each client loops over requests whose kind it draws at
random (seeded) from a mix of

- valid requests on one small synthetic scan (a bright tumour-like blob in an ellipsoid "brain", four
  modalities written once with nibabel): four 3D parts or one 4D ``image``, ``format=json`` or ``nifti``;
- invalid requests: corrupt gzip (bad checksum), truncated gzip, a missing part, an unknown model, a body
  that is not multipart, a header that claims more voxels than allowed;
- abandoned requests: the client closes the connection part way through the upload, or after sending it
  all, while the service queues or runs it.

Before the load, one valid request on the idle service gives the reference mask: every later 200 must carry
exactly that mask. After the load the script waits until no inference runs or waits, sends one more valid
request, and reads the server's memory (``VmRSS``, ``VmHWM``) and open file descriptors from ``/proc``.

Pass criteria (exit status 1 if any fails, 0 if all pass, 2 if the run itself could not be made):

- every answer is one the request's kind expects (its status, or 503 "queue full" with ``Retry-After``),
  and no request fails at the transport level (abandoned ones excepted);
- no 5xx other than that 503;
- every 200 carries the reference mask, at least one 200 came during the load, and the final request too;
- after the load, the service drains (nothing running or waiting) within ``--drain-timeout`` seconds;
- the resident memory at the end is at most 10% above the one after the warm-up;
- no more open file descriptors at the end than after the warm-up;
- nothing left in the temporary upload folder.

Results go to stdout (a progress line every 10 s, then the tables) and to ``--out`` (default
``runs/soak/``): ``soak.json`` (figures, command line, settings, machine, library versions), ``soak.md``
(the tables, ready to paste) and ``server.log``. Linux only (``/proc``). Ctrl-C or SIGTERM stop the run
and the server.

The package: :mod:`~benchmarks.soak.payloads` (the synthetic scan and the request bytes),
:mod:`~benchmarks.soak.requester` (the request kinds, sending one and judging its answer),
:mod:`~benchmarks.soak.server` (the service under test), :mod:`~benchmarks.soak.load` (the client threads and
their tally), :mod:`~benchmarks.soak.report` (the figures, the criteria, ``soak.md``) and
:mod:`~benchmarks.soak.run` (the run and its command line).
"""

from benchmarks.soak.load import Tally, run_load
from benchmarks.soak.payloads import Payloads, decode_mask, synthetic_scan
from benchmarks.soak.report import Report, judge, markdown, write_outputs
from benchmarks.soak.requester import KIND_BY_NAME, KINDS, Kind, Outcome, Requester, labels_problem
from benchmarks.soak.run import main, parse_args, soak
from benchmarks.soak.server import Server, SoakError

__all__ = [
    "KINDS", "KIND_BY_NAME", "Kind", "Outcome", "Payloads", "Report", "Requester", "Server", "SoakError", "Tally",
    "decode_mask", "judge", "labels_problem", "main", "markdown", "parse_args", "run_load", "soak",
    "synthetic_scan", "write_outputs",
]
