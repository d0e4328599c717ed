"""Turn parsing of the episode protocol: what a generated turn asks for, why a malformed call is invalid, and the
answer a turn gives."""
from __future__ import annotations

import pytest

from episode.turns import ORACLE_TURN_RE, last_answer, parse_turn


@pytest.mark.parametrize("text, kind, query, answer, error", [
    ("<reason> r </reason><answer> Paris </answer>", "answer", "", " Paris ", ""),
    ("<reason> r </reason><search><img></search>", "image_search", "", None, ""),
    ("<reason> r </reason><search> <img> </search>\n", "image_search", "", None, ""),
    ("<reason> r </reason><text_search> capital of x </text_search>", "text_search", "capital of x", None, ""),
    ("<reason> r </reason><search>a dog</search>", "invalid_call", "", None, "bad_image_call"),
    ("<reason> r </reason></search>", "invalid_call", "", None, "orphan_close"),
    ("<reason> r </reason><text_search>   </text_search>", "invalid_call", "", None, "empty_query"),
    ("<reason> r </reason><text_search></text_search>", "invalid_call", "", None, "empty_query"),
    ("<reason> r </reason></text_search>", "invalid_call", "", None, "orphan_close"),
    ("<reason> r </reason></answer>", "invalid_call", "", None, "orphan_close"),
    # nested or foreign tags inside a call
    ("<search><search><img></search>", "invalid_call", "", None, "nested_tags"),
    ("<search><img><answer> x </search>", "invalid_call", "", None, "nested_tags"),
    ("<text_search> a <text_search> b </text_search>", "invalid_call", "", None, "nested_tags"),
    ("<text_search> a <reason> b </reason> c </text_search>", "invalid_call", "", None, "nested_tags"),
    ("<answer> <answer> paris </answer>", "invalid_call", "", None, "nested_tags"),
    ("<answer> <search><img></search> paris </answer>", "invalid_call", "", None, "nested_tags"),
    ("<reason> r </reason><answer> London </answer> no, <answer> Paris </answer>", "answer", "", " Paris ", ""),
    ("<reason> r </reason> the answer is paris<|im_end|>", "none", "", None, ""),
    ("<reason> r </reason><answer> Paris", "none", "", None, ""),  # never closed (cut by a length limit)
    ("", "none", "", None, ""),
])
def test_parse_turn(text, kind, query, answer, error):
    action = parse_turn(text)
    assert (action.kind, action.query, action.answer, action.error) == (kind, query, answer, error)


def test_the_last_complete_answer_of_a_turn_is_read():
    assert last_answer("<reason> r </reason><answer> London </answer> no, <answer> Paris </answer>") == " Paris "
    assert last_answer("<reason> r </reason><answer> Paris") is None
    assert last_answer("</answer> <answer>") is None


def test_the_oracle_turn_shape_is_one_reason_then_one_action():
    assert ORACLE_TURN_RE.match("<reason>i search.</reason><search><img></search>").group("image")
    assert ORACLE_TURN_RE.match("<reason>r</reason><text_search> x maker </text_search>").group("query") == " x maker "
    assert ORACLE_TURN_RE.match("<reason>r</reason><answer> quenby </answer>").group("answer") == " quenby "
    assert ORACLE_TURN_RE.match("<reason>r</reason><answer> a </answer> more") is None
