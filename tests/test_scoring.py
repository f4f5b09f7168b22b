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


def test_a_recording_read_a_block_at_a_time_scores_as_the_whole_one(numpy_model, dev_audio) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.engine.decoder import DecoderSettings
    from edge_agent.engine.model import KeywordSpec
    from edge_agent.recording import Recording
    from edge_agent.scoring import keyword_scores, recording_scores

    keywords = [numpy_model.compile(KeywordSpec(text, 0.05)) for text in ("小云小云", "如家酒店")]
    settings = DecoderSettings()
    for path in [*sorted(dev_audio.glob("pos/*.wav"))[:2], *sorted(dev_audio.glob("neg/*.wav"))[:2]]:
        whole = keyword_scores(
            numpy_model, keywords, settings, numpy_model.posteriors(Recording(path).samples())
        )
        blocks = recording_scores(numpy_model, keywords, settings, Recording(path).blocks())
        assert blocks == pytest.approx(whole, rel=1e-6), path.name
