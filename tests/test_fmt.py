"""Number formatting shared by the TUI and headless output: axis ticks in particular."""

import pytest

from bsmon import fmt


@pytest.mark.parametrize("low, high, count, labels", [
    (0, 106_294.5, 5, ["0", "20k", "40k", "60k", "80k", "100k"]),
    (0, 5_374_091.9, 5, ["0", "1M", "2M", "3M", "4M", "5M"]),
    (64, 6000, 6, ["1k", "2k", "3k", "4k", "5k", "6k"]),
    (0, 1.05, 5, ["0", "0.2", "0.4", "0.6", "0.8", "1"]),
    (0.38, 1.91, 5, ["0.5", "1", "1.5"]),
    (17, 17.5, 4, ["17", "17.2", "17.4"]),
])
def test_linear_ticks_are_1_2_5_steps_with_si_labels(low, high, count, labels):
    ticks = fmt.ticks(low, high, count)
    assert [fmt.tick_label(t) for t in ticks] == labels
    assert all(low <= t <= high for t in ticks) and len(ticks) <= count + 1


@pytest.mark.parametrize("low, high, count, labels", [
    (64, 6000, 6, ["100", "200", "500", "1k", "2k", "5k"]),
    (145, 18_070, 5, ["300", "1k", "3k", "10k"]),
    (32, 6e6, 5, ["100", "1k", "10k", "100k", "1M"]),
    (1, 1e9, 5, ["1", "100", "10k", "1M", "100M"]),
    (3800, 12_000, 5, ["5k", "10k"]),  # less than a decade: round linear steps on the log axis
])
def test_log_ticks_are_round_per_decade(low, high, count, labels):
    assert [fmt.tick_label(t) for t in fmt.log_ticks(low, high, count)] == labels


def test_degenerate_ranges_give_what_they_can():
    assert fmt.ticks(5, 5) == [5]
    assert fmt.ticks(float("nan"), 1) == []
    assert fmt.log_ticks(0, 100, 5) == fmt.ticks(0, 100, 5)  # no log axis through zero
