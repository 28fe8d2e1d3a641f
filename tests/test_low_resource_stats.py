"""The statistics and the bookkeeping of bench/low_resource.py (issue 32): the Student-t quantile against the
published table, the paired interval against a worked example, the dev choice and its tie-break, the seed's
subset. The experiment itself runs in CI as ``low_resource.py --quick`` (twice, the rerun training nothing)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from accuracy import Split
from low_resource import GRIDS, Experiment, chosen_values, paired, seed_subset, student_t_quantile

# Student's t quantiles, from the printed table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), to 3 decimals.
T_TABLE = {
    (0.975, 1): 12.706, (0.975, 2): 4.303, (0.975, 4): 2.776, (0.975, 9): 2.262, (0.975, 19): 2.093,
    (0.975, 29): 2.045, (0.95, 9): 1.833, (0.995, 9): 3.250, (0.9, 5): 1.476,
}  # fmt: skip


@pytest.mark.parametrize(("p", "df"), list(T_TABLE))
def test_the_t_quantile_is_the_tables(p, df):
    assert student_t_quantile(p, df) == pytest.approx(T_TABLE[p, df], abs=6e-4)


@pytest.mark.parametrize(("p", "df"), [(0.5, 3), (1.0, 3), (0.975, 0)])
def test_the_t_quantile_refuses_what_it_cannot_give(p, df):
    with pytest.raises(ValueError, match=re.escape("0.5 < p < 1 and df >= 1")):
        student_t_quantile(p, df)


def test_the_paired_interval_on_a_worked_example():
    # differences 1..5: mean 3, sd sqrt(2.5), n 5, t(0.975, 4) = 2.7764: 3 +- 2.7764 * sqrt(2.5 / 5)
    method = {s: 0.5 + d / 100 for s, d in enumerate([1, 2, 3, 4, 5])}
    plain = {s: 0.5 for s in range(6)}  # seed 5 has no method run: left out of the pairs
    result = paired(method, plain)
    assert result.seeds == [0, 1, 2, 3, 4]
    assert result.mean == pytest.approx(0.03)
    half = 2.7764 * math.sqrt(2.5 / 5) / 100
    low, high = result.interval()
    assert (low, high) == (pytest.approx(0.03 - half, abs=1e-6), pytest.approx(0.03 + half, abs=1e-6))
    assert (result.improved, result.worse) == (5, 0)


def test_seeds_that_tie_count_as_neither_better_nor_worse():
    result = paired({0: 0.7, 1: 0.6, 2: 0.8}, {0: 0.7, 1: 0.65, 2: 0.75})
    assert (result.improved, result.worse) == (1, 1)


def _experiment(grids: dict[str, tuple[float, ...]], tuning: tuple[int, ...]) -> Experiment:
    return Experiment(setup=None, train_pool=None, key="k", seeds=(0,), tuning_seeds=tuning, grids=grids)


def _tune_row(method: str, value: float, seed: int, dev: float) -> dict:
    return {"role": "tune", "method": method, "value": str(value), "seed": str(seed), "dev_acc": str(dev)}


def test_the_dev_choice_takes_the_best_mean_over_the_tuning_seeds_and_waits_for_every_run():
    exp = _experiment({"fgm": (0.3, 1.0, 3.0)}, (100, 101))
    rows = [_tune_row("fgm", v, s, dev) for v, s, dev in [(0.3, 100, 0.7712), (0.3, 101, 0.7301), (1.0, 100, 0.74)]]
    assert chosen_values(rows, exp) is None, "a tuning run is missing: nothing may be chosen yet"
    rows += [_tune_row("fgm", 1.0, 101, 0.7401), _tune_row("fgm", 3.0, 100, 0.7511), _tune_row("fgm", 3.0, 101, 0.7)]
    # means: 0.3 -> 0.75065, 1.0 -> 0.74005, 3.0 -> 0.72555; seed 100 alone would take 0.3 too, seed 101 1.0
    assert chosen_values(rows, exp) == {"fgm": 0.3}
    rows[1]["dev_acc"] = "0.7001"  # 0.3 -> 0.73565: 1.0 is best
    assert chosen_values(rows, exp) == {"fgm": 1.0}


def test_a_dev_tie_goes_to_the_value_nearest_the_default():
    exp = _experiment({"gp_fd": GRIDS["gp_fd"]}, (100,))  # 0.1, 0.3, 1; default 1
    rows = [_tune_row("gp_fd", v, 100, 0.7497) for v in (0.1, 0.3, 1.0)]
    assert chosen_values(rows, exp) == {"gp_fd": 1.0}
    rows[-1]["dev_acc"] = "0.7487"  # 1 drops out of the tie: 0.3 is nearer the default than 0.1
    assert chosen_values(rows, exp) == {"gp_fd": 0.3}


def test_each_seed_draws_its_own_subset_and_always_the_same_one():
    pool = Split([[i] for i in range(500)], torch.arange(500) % 3)
    first, again, other = seed_subset(pool, 64, 0), seed_subset(pool, 64, 0), seed_subset(pool, 64, 1)
    assert first.ids == again.ids and torch.equal(first.labels, again.labels)
    assert first.ids != other.ids
    assert len(first.ids) == 64 and len({i for (i,) in first.ids}) == 64, "drawn without replacement"
    assert torch.equal(first.labels, torch.tensor([i for (i,) in first.ids]) % 3), "labels follow their examples"
    with pytest.raises(ValueError, match="501 training examples asked for, the pool has 500"):
        seed_subset(pool, 501, 0)
