"""Tiny synthetic BraTS-like datasets shared by the training pipeline tests."""

from __future__ import annotations

import pytest

from training.data.synthetic import generate_dataset

TINY_SIZE = (48, 48, 32)
TINY_SPACING = (5.0, 5.0, 5.0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six small labelled cases in the BraTS 2020 layout (the generator marks them synthetic)."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, 6, seed=11, size=TINY_SIZE, spacing=TINY_SPACING, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory):
    """The tiny dataset preprocessed into a cache, through the CLI as a user runs it."""
    from training.cli import main

    cache = tmp_path_factory.mktemp("cache")
    assert main(["preprocess", str(tiny_dataset), str(cache)]) == 0
    return cache
