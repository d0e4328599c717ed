"""Answer normalisation: the one comparison every scorer (reward, eval, curation, warm-start evaluation) uses."""
from __future__ import annotations

from episode.answers import answer_matches, normalize_answer


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  An Apple, the PIE. ") == "apple pie"
    assert normalize_answer(" Quenby ") == "quenby"


def test_matching_uses_the_aliases_and_never_matches_empty_targets():
    assert answer_matches(" Quenby ", "quenby", [])
    assert answer_matches("the city of quenby.", "quenby", ["the city of quenby"])
    assert not answer_matches("quenb", "quenby", ["quenby city"])
    assert not answer_matches("paris", "", [])
    assert not answer_matches(None, "paris", [])


def test_subem_matches_a_target_on_word_boundaries():
    assert answer_matches("dark red", "red", [], match="subem")
    assert not answer_matches("reddish", "red", [], match="subem")
    assert not answer_matches("dark red", "red", [], match="exact")
