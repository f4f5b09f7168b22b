from __future__ import annotations

import pytest

from edge_agent.scoring import SCORE_FLOOR, best_threshold


@pytest.mark.parametrize("score", [0.002, 0.05, 0.5, 0.93])
def test_best_threshold_finds_a_score_to_about_one_percent(score: float) -> None:
    found = best_threshold(lambda threshold: threshold <= score)
    assert score / 1.01 <= found <= score


def test_best_threshold_ends_of_the_range() -> None:
    assert best_threshold(lambda threshold: True) == 1.0
    assert best_threshold(lambda threshold: threshold < SCORE_FLOOR) == 0.0
