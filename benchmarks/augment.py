"""Cost of the training augmentation: ``python -m benchmarks.augment [--sizes 64 96] [--repeats 7] [--patches 60]``.

Times :class:`training.data.augment.Augmenter` on one thread (``torch.set_num_threads(1)``, as in a data
loader worker) on a synthetic ``4 x N^d`` patch: a brain ellipsoid of smooth z-scored noise with zero
background, tumour cubes labelled 1, 2 and 4. For each transform alone (probability 1, every channel) the
median of ``--repeats`` calls after one warm-up; then the mean over ``--patches`` calls with the default
probabilities, which is what a training patch costs on average. Prints a markdown table (ms).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from training.data.augment import TRANSFORMS, AugmentOptions, Augmenter


def patch(size: int, spatial_dims: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``(4, size, ...)`` float32 image with zero background and its uint8 label."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * spatial_dims, indexing="ij")
    brain = sum(a**2 for a in axes) < 0.85
    image = (rng.normal(size=(4,) + brain.shape) * brain).astype(np.float32)
    label = np.zeros(brain.shape, np.uint8)
    q = size // 8
    for value, start in ((1, 2 * q), (2, 3 * q), (4, 4 * q)):
        label[tuple(slice(start, start + q) for _ in range(spatial_dims))] = value
    image += 3.0 * (label > 0)
    return image, label


def time_calls(augment: Augmenter, image: np.ndarray, label: np.ndarray, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls (after one warm-up call)."""
    augment(image, label)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        augment(image, label)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="patch edge lengths (3D)")
    parser.add_argument("--repeats", type=int, default=7, help="calls per transform (median)")
    parser.add_argument("--patches", type=int, default=60, help="calls with the default probabilities (mean)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows: dict[str, list[str]] = {}
    for size in args.sizes:
        image, label = patch(size)
        cases = {"copy only (nothing on)": AugmentOptions.only()}
        cases |= {name: AugmentOptions.only(name, p_per_channel=1.0) for name in TRANSFORMS}
        cases["rotation + scaling"] = AugmentOptions.only("rotation", "scaling")
        for name, options in cases.items():
            times = time_calls(Augmenter(spatial_dims=3, seed=0, options=options), image, label, args.repeats)
            rows.setdefault(f"{name}, median", []).append(f"{statistics.median(times):.1f}")
        times = time_calls(Augmenter(spatial_dims=3, seed=0), image, label, args.patches)
        rows.setdefault("**defaults, mean per patch**", []).append(f"**{statistics.fmean(times):.1f}**")

    print("| transform (alone, p = 1) | " + " | ".join(f"4 x {s}^3 (ms)" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
