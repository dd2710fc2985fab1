"""dev/intervals.py: the 95% t interval against a hand computation."""

import math

from dev.intervals import formatted, interval


def test_interval_matches_a_hand_computed_t_interval():
    mean, half = interval([0.2, 0.3, 0.4])
    assert abs(mean - 0.3) < 1e-12
    assert abs(half - 4.303 * 0.1 / math.sqrt(3)) < 1e-12  # sample std 0.1, 2 degrees of freedom
    assert interval([0.5])[0] == 0.5 and math.isnan(interval([0.5])[1])
    assert all(math.isnan(x) for x in interval([]))
    assert interval([1.0, float("nan"), 3.0])[0] == 2.0  # runs without a value are left out
    assert abs(interval([1.0] * 20 + [2.0] * 20)[1] - 1.96 * 0.5063696835418333 / math.sqrt(40)) < 1e-9  # beyond the table


def test_formatted_cells():
    assert formatted([0.2, 0.3, 0.4]) == f"0.300 ± {4.303 * 0.1 / math.sqrt(3):.3f}"
    assert formatted([0.25], digits=2) == "0.25" and formatted([]) == "n/a" and formatted([float("nan")]) == "n/a"
