"""Dataset readers, synthetic data, caching, sampling and augmentation."""
