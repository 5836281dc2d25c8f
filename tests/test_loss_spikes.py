"""loss_spikes (telescope.lens): spikes of a loss curve above a multiple of its running
minimum, on hand-made curves."""

from __future__ import annotations

import math

import pytest

from telescope.lens import loss_spikes


def test_loss_spikes():
    steps = list(range(10))
    losses = [1.0, 0.5, 0.1, 0.01, 0.5, 0.9, 0.05, 0.001, 0.0005, 0.02]
    spikes = loss_spikes(steps, losses, factor=10.0)
    # 0.5 > 10 * 0.01: a spike from step 4 to 6 peaking at 5; then 0.02 > 10 * 0.0005 at the end
    assert [(s["start"], s["peak"], s["end"]) for s in spikes] == [(4, 5, 6), (9, 9, 9)]
    assert spikes[0]["height"] == pytest.approx(90.0)
    assert loss_spikes([0, 1, 2], [1.0, 0.9, 0.8]) == []
    assert loss_spikes([0, 1], [1.0, math.nan])[0]["peak"] == 1
