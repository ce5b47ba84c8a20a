"""The soak test's input: one small synthetic scan, written once with nibabel, and the request bytes made of it."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from service.core.labels import MODALITIES

CLAIMED_SHAPE = (1024, 1024, 1024)
"""What the oversized header claims: 1 Gi voxels, far above the service's default limit of 64 Mi."""


def synthetic_scan(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A small BraTS-like scan ``(4, X, Y, Z)`` int16, channels in ``MODALITIES`` order.

    An ellipsoid "brain" on a zero background, with a spherical lesion off centre: a dark core, an enhancing
    rim bright on T1ce, and edema around it bright on FLAIR and T2; a mild intensity gradient and Gaussian
    noise. Deterministic from ``seed``.
    """
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    brain = sum((a / 0.85) ** 2 for a in axes) <= 1.0
    distance = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, (0.3, -0.2, 0.1)))) / 0.3
    core = brain & (distance <= 0.5)
    rim = brain & (distance > 0.5) & (distance <= 0.75)
    edema = brain & (distance > 0.75) & (distance <= 1.3)
    #            healthy, edema, rim, core
    contrasts = {
        "flair": (300, 650, 550, 500),
        "t1": (500, 430, 420, 250),
        "t1ce": (520, 450, 1100, 260),
        "t2": (400, 900, 700, 1000),
    }
    gradient = 1.0 + 0.05 * axes[0]
    channels = []
    for modality in MODALITIES:
        healthy, in_edema, in_rim, in_core = contrasts[modality]
        volume = np.zeros(shape, dtype=np.float64)
        volume[brain] = healthy
        volume[edema] = in_edema
        volume[rim] = in_rim
        volume[core] = in_core
        volume = volume * gradient + rng.normal(0.0, 12.0, size=shape)
        volume[~brain] = 0.0
        channels.append(np.clip(np.rint(volume), 0, None).astype(np.int16))
    return np.stack(channels)


def _affine() -> np.ndarray:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-32.0, -40.0, -20.0)
    return affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, path)
    return path.read_bytes()


def _oversized_claim(affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI whose header claims :data:`CLAIMED_SHAPE` but holds 4 KiB of data."""
    image = nib.Nifti1Image(np.zeros((16, 16, 8), dtype=np.int16), affine)
    raw = image.to_bytes()
    header = image.header.copy()
    header.set_data_shape(CLAIMED_SHAPE)
    return gzip.compress(header.binaryblock + raw[len(header.binaryblock):], mtime=0)


@dataclass(frozen=True)
class Payloads:
    """The bytes every request is made of, built once at start.

    Attributes:
        modalities: ``.nii.gz`` bytes of each 3D modality, by part name.
        image: ``.nii.gz`` bytes of the same scan as one 4D volume ``(X, Y, Z, 4)``.
        bad_checksum: the FLAIR file with its gzip CRC-32 altered.
        truncated: the first half of the FLAIR file.
        oversized: a FLAIR header claiming :data:`CLAIMED_SHAPE`.
        shape: the scan's shape.
    """

    modalities: dict[str, bytes]
    image: bytes
    bad_checksum: bytes
    truncated: bytes
    oversized: bytes
    shape: tuple[int, int, int]

    @classmethod
    def build(cls, folder: Path, shape: tuple[int, int, int], seed: int) -> Payloads:
        """Write the scan's files into ``folder`` with nibabel and keep their bytes."""
        folder.mkdir(parents=True, exist_ok=True)
        scan = synthetic_scan(shape, seed)
        affine = _affine()
        modalities = {m: _save(folder / f"{m}.nii.gz", scan[i], affine) for i, m in enumerate(MODALITIES)}
        image = _save(folder / "image.nii.gz", np.ascontiguousarray(np.moveaxis(scan, 0, -1)), affine)
        flair = modalities["flair"]
        bad_checksum = bytearray(flair)
        bad_checksum[-8] ^= 0xFF  # first byte of the CRC-32 in the gzip trailer
        return cls(
            modalities=modalities,
            image=image,
            bad_checksum=bytes(bad_checksum),
            truncated=flair[: len(flair) // 2],
            oversized=_oversized_claim(affine),
            shape=shape,
        )

    def parts(self, **replace: bytes | None) -> list[tuple[str, tuple[str, bytes, str]]]:
        """The four modality parts for httpx's ``files=``; ``replace`` swaps (bytes) or drops (``None``) one."""
        files = []
        for name in MODALITIES:
            content = replace.get(name, self.modalities[name])
            if content is not None:
                files.append((name, (f"{name}.nii.gz", content, "application/gzip")))
        return files

    def image_part(self) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("image", ("image.nii.gz", self.image, "application/gzip"))]


def decode_mask(content: bytes) -> np.ndarray:
    """The label array of a ``.nii.gz`` mask (as the service returns it)."""
    raw = gzip.decompress(content)
    return np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)
