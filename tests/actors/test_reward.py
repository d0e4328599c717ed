"""The MMSearch-R1 reward, checked against hand-computed values."""
from __future__ import annotations

import pytest

from actors.reward import RewardConfig, compute_reward, format_score, normalize_answer

R = "<reason> think </reason>"
IMG = "<search><img></search>"


def answer(text: str) -> str:
    return f"<answer>{text}</answer>"


def test_correct_without_search_is_one():
    r = compute_reward([R + answer("Paris")], "paris", [])
    assert (r.total, r.accuracy, r.format, r.penalty) == (pytest.approx(1.0), 1.0, 1.0, 1.0)
    assert (r.image_searches, r.text_searches) == (0, 0)


def test_correct_with_one_search_is_0_91():
    r = compute_reward([R + IMG, R + answer("Paris")], "paris", [])
    # (1 - 0.1) * 1 * 0.9 + 0.1 * 1
    assert r.total == pytest.approx(0.91)
    assert (r.penalty, r.image_searches, r.text_searches) == (pytest.approx(0.9), 1, 0)


def test_correct_with_two_searches_has_the_same_single_penalty():
    r = compute_reward([R + IMG, R + "<text_search> capital </text_search>", R + answer("Paris")], "paris", [])
    assert r.total == pytest.approx(0.91)
    assert (r.image_searches, r.text_searches) == (1, 1)


def test_wrong_but_well_formatted_is_0_1():
    r = compute_reward([R + "<text_search> q </text_search>", R + answer("London")], "paris", ["paree"])
    assert (r.total, r.accuracy, r.format, r.penalty) == (pytest.approx(0.1), 0.0, 1.0, 1.0)


def test_no_answer_is_zero():
    r = compute_reward([R + "I do not know"], "paris", [])
    assert (r.total, r.accuracy, r.format) == (0.0, 0.0, 0.0)
    assert compute_reward([], "paris", []).total == 0.0


def test_alias_and_normalisation_match():
    assert compute_reward([R + answer(" The  Eiffel-Tower! ")], "tour eiffel", ["eiffel tower"]).accuracy == 1.0
    assert normalize_answer("  An Apple, the PIE. ") == "apple pie"
    assert compute_reward([R + answer("Paris")], "", []).accuracy == 0.0  # empty targets never match


def test_last_answer_of_the_final_turn_counts():
    r = compute_reward([R + "<answer>london</answer> wait " + answer("paris")], "paris", [])
    assert r.accuracy == 1.0 and r.format == 0.0  # correct, but two answers break the format
    assert r.total == pytest.approx(0.9)


def test_correct_but_badly_formatted_gets_only_the_accuracy_term():
    r = compute_reward(["no reasoning " + answer("paris")], "paris", [])
    assert (r.accuracy, r.format, r.total) == (1.0, 0.0, pytest.approx(0.9))


@pytest.mark.parametrize("turns", [
    [R + IMG, R + IMG, R + answer("x")],                       # two image searches: not a valid pattern
    [R + "<text_search> q </text_search>", R + IMG, R + answer("x")],  # text before image
    [R + IMG],                                                  # ends without an answer
    [R + R + answer("x")],                                      # two reason blocks
    [answer("x") + R],                                          # reason after the action
    [R + "<search>dog</search>", R + answer("x")],              # image search without <img>
    [R + answer("x"), R + answer("y")],                         # answer before the final turn
])
def test_invalid_formats_score_zero(turns):
    assert format_score(turns) == 0.0


@pytest.mark.parametrize("turns", [
    [R + answer("x")],
    [R + IMG, R + answer("x")],
    [R + "<text_search> q </text_search>", R + answer("x")],
    [R + IMG, R + "<text_search> q </text_search>", R + answer("x")],
])
def test_valid_patterns_score_one(turns):
    assert format_score(turns) == 1.0


def test_config_changes_the_weights():
    r = compute_reward([R + IMG, R + answer("paris")], "paris", [], RewardConfig(format_weight=0.0, search_penalty=0.5))
    assert r.total == pytest.approx(0.5)
