"""Offline training package: data, networks, training, export and evaluation."""
