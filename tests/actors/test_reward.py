"""The MMSearch-R1 reward, checked against hand-computed values."""
from __future__ import annotations

import pytest

from actors.reward import RewardConfig, compute_reward, format_score

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


TXT = "<text_search> capital </text_search>"


def test_per_search_penalty_counts_every_search():
    cfg = RewardConfig(penalty_mode="per_search")
    one = compute_reward([R + IMG, R + answer("paris")], "paris", [], cfg)
    two = compute_reward([R + IMG, R + TXT, R + answer("paris")], "paris", [], cfg)
    assert one.total == pytest.approx(0.9 * 0.9 + 0.1)  # 0.91, same as the paper's for one search
    assert (two.penalty, two.total) == (pytest.approx(0.8), pytest.approx(0.9 * 0.8 + 0.1))  # 0.82
    steep = RewardConfig(penalty_mode="per_search", search_penalty=0.6)
    assert compute_reward([R + IMG, R + TXT, R + answer("paris")], "paris", [], steep).penalty == 0.0  # floored
    # wrong answers are never penalised for searching
    assert compute_reward([R + IMG, R + TXT, R + answer("rome")], "paris", [], cfg).penalty == 1.0


def test_penalty_warms_up_linearly_over_policy_versions():
    cfg = RewardConfig(penalty_warmup=10)
    turns = [R + IMG, R + answer("paris")]
    assert compute_reward(turns, "paris", [], cfg, version=0).total == pytest.approx(1.0)  # no penalty yet
    assert compute_reward(turns, "paris", [], cfg, version=5).total == pytest.approx(0.9 * 0.95 + 0.1)  # 0.955
    assert compute_reward(turns, "paris", [], cfg, version=10).total == pytest.approx(0.91)
    assert compute_reward(turns, "paris", [], cfg, version=50).total == pytest.approx(0.91)  # capped at full
    both = RewardConfig(penalty_mode="per_search", penalty_warmup=4)
    turns2 = [R + IMG, R + TXT, R + answer("paris")]
    assert compute_reward(turns2, "paris", [], both, version=2).penalty == pytest.approx(1 - 0.05 * 2)  # 0.9


def test_subem_matches_a_target_on_word_boundaries():
    cfg = RewardConfig(match="subem")
    assert compute_reward([R + answer("it is the Eiffel Tower, in Paris")], "eiffel tower", [], cfg).accuracy == 1.0
    assert compute_reward([R + answer("dark red")], "crimson", ["red"], cfg).accuracy == 1.0
    assert compute_reward([R + answer("reddish")], "red", [], cfg).accuracy == 0.0  # not inside a word
    assert compute_reward([R + answer("dark red")], "red", []).accuracy == 0.0  # exact match is the default


def test_turn_patterns_are_configurable():
    only_direct = RewardConfig(valid_patterns=("answer",))
    assert format_score([R + IMG, R + answer("x")], only_direct) == 0.0
    assert format_score([R + answer("x")], only_direct) == 1.0
    text_first = RewardConfig(valid_patterns=("answer", "text,image,answer"))
    assert format_score([R + TXT, R + IMG, R + answer("x")], text_first) == 1.0
    assert format_score([R + IMG, R + TXT, R + answer("x")], text_first) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"penalty_mode": "quadratic"}, "penalty_mode"),
    ({"match": "fuzzy"}, "match"),
    ({"valid_patterns": ("image",)}, "invalid turn pattern"),
    ({"valid_patterns": ("answer,image,answer",)}, "invalid turn pattern"),
    ({"valid_patterns": ("video,answer",)}, "invalid turn pattern"),
    ({"format_weight": 1.5}, "format_weight"),
    ({"penalty_warmup": -1}, "penalty_warmup"),
])
def test_bad_reward_settings_fail_loudly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)
