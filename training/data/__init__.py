"""Synthetic data, caching, sampling and augmentation (the dataset readers are in ``service.core.datasets``)."""
