"""Covering designs for the differential tests (test_capture_matrix, distributed's
matrix_worker): a few cases that hold every pair of axis values a valid case can hold."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

Axes = dict[str, tuple]


def covering(
    axes: Axes, valid: Callable[[dict[str, Any]], bool], seed: int = 0, candidates: int = 40
) -> list[dict[str, Any]]:
    """A greedy covering design (AETG's): for each pair of axis values not yet held by a case,
    the valid random case that holds it and the most other uncovered pairs; a pair that no
    valid case holds is dropped. The same cases for the same seed, in any process."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = {
        ((a, u), (b, v))
        for a, b in itertools.combinations(names, 2)
        for u in axes[a]
        for v in axes[b]
    }
    cases: list[dict[str, Any]] = []
    while uncovered:
        pair = min(uncovered, key=repr)
        best, gain = None, -1
        for _ in range(candidates):
            case = {n: rng.choice(axes[n]) for n in names}
            case.update(dict(pair))
            if valid(case) and len(pairs(axes, case) & uncovered) > gain:
                best, gain = case, len(pairs(axes, case) & uncovered)
        if best is None:
            uncovered.discard(pair)
            continue
        uncovered -= pairs(axes, best)
        cases.append(best)
    return cases


def pairs(axes: Axes, case: dict[str, Any]) -> set:
    """The pairs of axis values ``case`` holds."""
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(axes, 2)}
