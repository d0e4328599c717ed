"""Copy drills for the warm start: short text-only chats in the episode's own phrases in which every name and value is
made up, so the only way to answer is to copy it from the context.

Why they exist (measured in the learner's SFT on the default world, 2-layer tiny model, batch 32): oracle episodes
alone taught the format and the pixels but no reliable copying (held-out name accuracy 0.0-0.2 after 800 steps);
600 steps of these drills alone gave exact drill copies of unseen names at 0.87-0.94, and mixing them into the warm
start is what lets it read search results (learner/README.md has the figures). Each chat holds `per_chat` drills of
four kinds, the four copies an episode needs:

    title    <information> title: A / title: B </information>  ->  the top result is A.      <answer> A </answer>
    question who made A?                                       ->  i need the maker of A.   <text_search> A maker
    fact     <information> title: A / A was made by ... M. </>  ->  the page says A ... M.   <answer> M </answer>
    object   who made the object ...? <information> title: A  ->  the object is A. ...     <text_search> A maker
"""
from __future__ import annotations

import numpy as np

from data.names import city_name, fresh_name, maker_name
from data.oracle import NEED, OBJECT_IS, PAGE_SAYS, TOP_RESULT, _answer, _text_query, _turn
from data.world import FACTS, IMAGE_FACT_QUESTIONS, TEXT_FACT_QUESTIONS, World, fact_sentence
from episode import prompts
from episode.tokenizer import EpisodeTokenizer
from protocol import Trajectory, to_ndarray

KINDS = ("title", "question", "fact", "object")


class CopyDrills:
    """Seeded copy-drill chats as trajectories (loss mask 1 on the assistant turns), rendered with the model's chat
    template and prompt format exactly as episode pieces are."""

    def __init__(self, world: World, tok: EpisodeTokenizer, seed: int, per_chat: int = 3,
                 fresh_value_fraction: float = 0.5, max_titles: int = 3) -> None:
        if per_chat < 1 or max_titles < 1:
            raise ValueError(f"per_chat={per_chat} and max_titles={max_titles} must be >= 1")
        self.world, self.tok, self.per_chat, self.max_titles = world, tok, per_chat, max_titles
        self.fresh_value_fraction = fresh_value_fraction
        self.rng = np.random.default_rng([seed, 41])
        self._taken = set(world.names())

    def _name(self) -> str:
        return fresh_name(self.rng, self._taken)

    def _value(self, fact: str) -> str:
        rng = self.rng
        if fact == "year":
            low, high = self.world.year_range
            return str(int(rng.integers(low, high + 1)))
        if rng.random() < self.fresh_value_fraction:
            return (city_name if fact == "city" else maker_name)(rng)
        pool = self.world.cities if fact == "city" else self.world.makers
        return pool[int(rng.integers(len(pool)))]

    def _titles(self) -> list[str]:
        return [self._name() for _ in range(int(self.rng.integers(1, self.max_titles + 1)))]

    def _info(self, lines: str) -> str:
        return prompts.INFO_OPEN + "\n" + lines + self.tok.prompt.info_close_text()

    def drill(self, kind: str) -> tuple[str, str]:
        """(user text, assistant turn) of one drill of `kind`."""
        fact = FACTS[int(self.rng.integers(len(FACTS)))]
        if kind == "title":
            titles = self._titles()
            lines = "".join(prompts.image_result_text(t) for t in titles)
            return self._info(lines), _turn(TOP_RESULT.format(name=titles[0]), _answer(titles[0]))
        if kind == "question":
            name = self._name()
            question = self.tok.prompt.first_user_text(TEXT_FACT_QUESTIONS[fact].format(name=name))
            return question, _turn(NEED.format(attribute=fact, name=name), _text_query(f"{name} {fact}"))
        if kind == "fact":
            name, value = self._name(), self._value(fact)
            sentence = fact_sentence(fact, name, value)
            return (self._info(prompts.text_result_text(name, sentence)),
                    _turn(PAGE_SAYS.format(sentence=sentence), _answer(value)))
        if kind == "object":
            titles = self._titles()
            question = self.tok.prompt.first_user_text(IMAGE_FACT_QUESTIONS[fact])
            lines = "".join(prompts.image_result_text(t) for t in titles)
            return (question + "\n" + self._info(lines),
                    _turn(OBJECT_IS.format(name=titles[0], attribute=fact), _text_query(f"{titles[0]} {fact}")))
        raise ValueError(f"unknown drill kind {kind!r}; known: {KINDS}")

    def trajectory(self) -> Trajectory:
        """One chat of `per_chat` drills of random kinds."""
        ids: list[int] = []
        mask: list[int] = []
        for i in range(self.per_chat):
            user, assistant = self.drill(KINDS[int(self.rng.integers(len(KINDS)))])
            message = {"role": "user", "content": [{"type": "text", "text": user}]}
            prompt = self.tok.text_prompt(message) if i == 0 else self.tok.continuation_with(message)
            generated = self.tok.tokenizer.encode(assistant, add_special_tokens=False)
            ids += prompt + generated
            mask += [0] * len(prompt) + [1] * len(generated)
        n = len(ids)
        return Trajectory(token_ids=to_ndarray(np.asarray(ids, np.int32)),
                          loss_mask=to_ndarray(np.asarray(mask, np.uint8)),
                          behaviour_logprobs=to_ndarray(np.zeros(n, np.float32)),
                          versions=to_ndarray(np.full(n, -1, np.int32)), images=[], reward=1.0,
                          num_turns=self.per_chat, finish_reason="answer")
