"""Oracle episodes: well-formed turns, faithful simulated results, configured search and fresh-name rates."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from data.oracle import OracleConfig, oracle_episode, oracle_episodes, oracle_texts
from data.world import fact_sentence
from episode import prompts
from episode.oracle import episode_messages
from episode.turns import IMAGE_SEARCH, TEXT_SEARCH

TURN = re.compile(r"^<reason>[^<]+</reason>(<search><img></search>|<text_search> [a-z0-9 ]+ </text_search>"
                  r"|<answer> [a-z0-9 ]+ </answer>)$")


def test_every_turn_is_well_formed_and_ends_with_the_answer(small_world):
    for ep in oracle_episodes(small_world, "train", seed=0):
        assert all(TURN.match(t.assistant) for t in ep.turns), ep.turns
        assert all(t.tool is not None for t in ep.turns[:-1]) and ep.turns[-1].tool is None
        assert ep.turns[-1].assistant.endswith(f"<answer> {ep.answer} </answer>")
        for t in ep.turns[:-1]:
            assert t.tool == (IMAGE_SEARCH if t.assistant.endswith(prompts.IMAGE_SEARCH_CALL) else TEXT_SEARCH)


def test_search_pattern_per_kind(small_world):
    expected = {"image_search": [IMAGE_SEARCH], "image_text_search": [IMAGE_SEARCH, TEXT_SEARCH],
                "text_search": [TEXT_SEARCH]}
    rag = [IMAGE_SEARCH, TEXT_SEARCH]  # the RAG workflow, any kind
    for ep in oracle_episodes(small_world, "train", seed=1, cfg=OracleConfig(rag_fraction=0.0)):
        tools = [t.tool for t in ep.turns[:-1]]
        if ep.kind == "pixels":
            assert tools in ([], [IMAGE_SEARCH])
        else:
            assert tools == expected[ep.kind]
        assert ep.hint == ("never_search" if ep.kind == "pixels" and not ep.searches and ep.hint else None)
    episodes = oracle_episodes(small_world, "train", seed=1, cfg=OracleConfig(rag_fraction=1.0))
    assert all([t.tool for t in ep.turns[:-1]] == rag and ep.hint == "always_search" for ep in episodes)
    direct = [ep for ep in oracle_episodes(small_world, "train", seed=2, cfg=OracleConfig(
        rag_fraction=0.0, pixel_search_fraction=0.0, never_hint_fraction=0.5)) if ep.kind == "pixels"]
    share = np.mean([ep.hint == "never_search" for ep in direct])
    assert 0.3 < share < 0.7 and all(len(ep.turns) == 1 for ep in direct)
    looks = [ep for ep in episodes if ep.kind in ("pixels", "image_search")]
    assert looks and all(ep.turns[1].results[0].text.startswith(f"{ep.turns[0].results[0].title} is a ")
                         for ep in looks)  # a colour/shape/name query reads the page's look sentence


def test_results_point_to_the_right_entity(small_world):
    cfg = OracleConfig(fresh_name_fraction=0.0, fact_shuffle_fraction=0.0, text_results=2, rag_fraction=0.0)
    rows = {r["id"]: r for r in small_world.questions}
    for ep in oracle_episodes(small_world, "train", seed=2, cfg=cfg):
        row = rows[ep.question_id]
        assert ep.answer == row["answer"] and ep.question == row["question"] and not ep.fresh_names
        for t in ep.turns[:-1]:
            titles = [h.title for h in t.results]
            assert titles[0] == row["entity"] and len(set(titles)) == len(titles)
            if t.tool == IMAGE_SEARCH:
                assert len(t.results) == cfg.image_results
                assert t.results[0].image in small_world.images_by_entity[row["entity"]]
            else:
                assert len(t.results) == cfg.text_results and all(h.image is None for h in t.results)
                assert t.results[0].text == fact_sentence(row["attribute"], row["entity"], row["answer"])
                assert t.results[0].text in small_world.pages[row["entity"]]["text"]
                assert f" {row['entity']} {row['attribute']} " in t.assistant
                assert ep.turns[-1].assistant.startswith(f"<reason>the page says {t.results[0].text}</reason>")


def test_distractors_come_from_the_same_split(small_world):
    split = {e.name: e.split for e in small_world.entities.values()}
    for name in ("train", "test"):
        cfg = OracleConfig(fresh_name_fraction=0.0, text_results=2)
        for ep in oracle_episodes(small_world, name, seed=3, cfg=cfg):
            assert all(split[h.title] == name for t in ep.turns for h in t.results)


def test_fresh_names_are_consistent_and_new(small_world):
    cfg = OracleConfig(fresh_name_fraction=1.0, pixel_search_fraction=1.0, fact_shuffle_fraction=0.0)
    rows = {r["id"]: r for r in small_world.questions}
    real = small_world.names()
    for ep in oracle_episodes(small_world, "train", seed=4, cfg=cfg):
        row = rows[ep.question_id]
        assert ep.fresh_names
        titles = [h.title for t in ep.turns for h in t.results]
        assert not set(titles) & real
        text = " ".join([ep.question, *(t.assistant for t in ep.turns), *(h.text for t in ep.turns for h in t.results)])
        assert not re.search(rf"\b{row['entity']}\b", text)  # the real name never shows
        stand_in = ep.turns[0].results[0].title
        if row["attribute"] == "name":
            assert ep.answer == stand_in
        else:
            assert ep.answer == row["answer"]  # facts stay true; only names change
        if row["kind"] == "text_search":
            assert re.search(rf"\b{stand_in}\b", ep.question)
        for t in ep.turns:
            if t.tool == TEXT_SEARCH:
                assert f" {stand_in} " in t.assistant and stand_in in t.results[0].text


def test_shuffled_facts_are_what_the_pages_say_and_not_the_world(small_world):
    cfg = OracleConfig(fact_shuffle_fraction=1.0, fresh_name_fraction=0.0, text_results=2)
    rows = {r["id"]: r for r in small_world.questions}
    differ = total = 0
    for ep in oracle_episodes(small_world, "train", seed=7, cfg=cfg):
        row = rows[ep.question_id]
        if row["attribute"] not in ("city", "maker", "year"):
            continue
        snippet = [h for t in ep.turns if t.tool == TEXT_SEARCH for h in t.results][0]
        assert snippet.title == row["entity"]
        assert snippet.text == fact_sentence(row["attribute"], row["entity"], ep.answer)  # the answer is readable
        total += 1
        differ += ep.answer != row["answer"]
    assert total > 20 and differ / total > 0.8  # ... but not recallable from the world


def test_simulated_text_search_is_what_the_local_text_tool_returns(small_world, small_paths):
    from tool_servers.backends.local_text import LocalTextSearch

    tool = LocalTextSearch(small_paths.text_corpus, top_k=1, max_chars=300, snippet_sentences=1)
    cfg = OracleConfig(fresh_name_fraction=0.0, fact_shuffle_fraction=0.0)
    checked = 0
    for ep in oracle_episodes(small_world, "train", seed=8, cfg=cfg):
        for turn in ep.turns:
            if turn.tool != TEXT_SEARCH:
                continue
            query = turn.assistant.split("<text_search>")[1].split("</text_search>")[0].strip()
            (item,) = tool.search(query)
            assert (item.title, item.text) == (turn.results[0].title, turn.results[0].text), query
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("pixel_search,fresh", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_configured_fractions_are_respected(small_world, pixel_search, fresh):
    eps = oracle_episodes(small_world, "train", seed=5,
                          cfg=OracleConfig(pixel_search_fraction=pixel_search, fresh_name_fraction=fresh,
                                           rag_fraction=0.0))
    pixel = [e for e in eps if e.kind == "pixels"]
    searching = [e for e in eps if e.searches]
    assert abs(np.mean([e.searches > 0 for e in pixel]) - pixel_search) < 0.15  # ~96 pixel questions: 3 sigma
    assert abs(np.mean([e.fresh_names for e in searching]) - fresh) < 0.12
    assert not any(e.fresh_names for e in eps if not e.searches)


def test_same_seed_same_episodes(small_world):
    assert oracle_episodes(small_world, "test", seed=9) == oracle_episodes(small_world, "test", seed=9)
    assert oracle_episodes(small_world, "test", seed=9) != oracle_episodes(small_world, "test", seed=10)


def test_messages_carry_one_image_per_image_part(small_world):
    for ep in oracle_episodes(small_world, "train", seed=6)[:60]:
        messages, images = episode_messages(ep)
        parts = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
        assert parts == len(images) == 1 + sum(h.image is not None for t in ep.turns for h in t.results)
        roles = [m["role"] for m in messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert messages[0] == prompts.first_user_message(ep.question, ep.hint)


def test_oracle_texts_are_the_assistant_turns(small_world):
    texts = list(oracle_texts(small_world, seed=0))
    assert texts and all(t.startswith(prompts.REASON_OPEN) for t in texts)


def test_bad_rows_and_configs_are_rejected(small_world):
    row = small_world.questions[0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown kind"):
        oracle_episode({**row, "kind": "video_search"}, small_world, rng)
    with pytest.raises(ValueError, match="unknown entity"):
        oracle_episode({**row, "entity": "nobody"}, small_world, rng)
    with pytest.raises(ValueError, match="pixel_search_fraction"):
        oracle_episode(row, small_world, rng, OracleConfig(pixel_search_fraction=1.5))
    with pytest.raises(ValueError, match="results"):
        oracle_episode(row, small_world, rng, replace(OracleConfig(), image_results=0))
    with pytest.raises(ValueError, match="no questions"):
        oracle_episodes(small_world, "validation", seed=0)
