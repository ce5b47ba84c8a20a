"""Torch-free core shared by training and the service: labels, NIfTI I/O, preprocessing, metrics."""
