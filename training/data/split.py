"""The train/validation split of a training run (``split.json``): deterministic, stratified by case kind."""

from __future__ import annotations

import numpy as np

__all__ = ["split_cases"]


def split_cases(case_ids: list[str], val_fraction: float, seed: int,
                kinds: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of case ids (at least one validation case when possible).

    With ``kinds`` (case id -> kind or grade) the split is stratified: each kind gives its share of validation
    cases (largest remainders first), so that a validation set, and the postprocessing learned on it, sees
    every kind of case in the proportions of the cohort.
    """
    ids = sorted(case_ids)
    if val_fraction <= 0 or len(ids) < 2:
        return ids, []
    rng = np.random.default_rng(seed)
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    groups: dict[str, list[str]] = {}
    for cid in ids:
        groups.setdefault((kinds or {}).get(cid, ""), []).append(cid)
    if len(groups) < 2:
        order = rng.permutation(len(ids))
        return _split(ids, {ids[i] for i in order[:n_val]})
    quotas = {kind: len(members) * n_val / len(ids) for kind, members in groups.items()}
    counts = {kind: int(q) for kind, q in quotas.items()}
    for kind in sorted(quotas, key=lambda k: (counts[k] - quotas[k], k))[: n_val - sum(counts.values())]:
        counts[kind] += 1  # the largest remainders get the validation cases left over
    val = set()
    for kind in sorted(groups):
        members = groups[kind]
        val.update(members[i] for i in rng.permutation(len(members))[: counts[kind]])
    return _split(ids, val)


def _split(ids: list[str], val: set[str]) -> tuple[list[str], list[str]]:
    return [i for i in ids if i not in val], sorted(val)
