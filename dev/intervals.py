"""
95% confidence intervals over a handful of seeds (Student's t), shared by the experiment reports in dev/
(grpo_variants, cotrain_experiment): with 3 seeds the t quantile is 4.3, not 1.96, and that matters.
"""

import math
import statistics

# two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond the table)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values):
    """(mean, half-width of its 95% t interval) of the non-NaN values; the half-width is NaN for fewer than
    two values, both are NaN for none."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def formatted(values, digits=3):
    """A report cell: 'mean ± half-width', just the mean for one value, 'n/a' for none."""
    mean, half = interval(values)
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half == half else "")
