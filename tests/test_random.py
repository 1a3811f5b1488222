"""gpunet.random: generators and their seeding, here where a captured step meets them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import gpunet


@pytest.mark.parametrize(
    "reseed",
    [lambda: gpunet.manual_seed(123), lambda: gpunet.Generator(7), lambda: None],
    ids=["manual_seed", "new Generator", "none"],
)
def test_reseeding_inside_a_captured_step_is_refused(reseed: Callable[[], object]) -> None:
    """Eager, a step that reseeds draws the same mask every call; a replay runs none of the
    step's Python, so it drew fresh masks instead (a silent difference). Refused at the
    user's line, saying to seed before the call; a step that does not reseed replays."""
    x = gpunet.ones(64)

    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        reseed()
        return gpunet.nn.functional.dropout(x, 0.5)

    captured = gpunet.capture(step)
    if reseed() is None:
        outs = [captured(x).numpy().copy() for _ in range(4)]
        assert not all(np.array_equal(outs[0], o) for o in outs[1:])  # fresh masks
        return
    with pytest.raises(gpunet.CaptureError, match=r"test_random.py.*Seed before"):
        captured(x)
