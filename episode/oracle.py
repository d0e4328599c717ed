"""Oracle episodes: the scripted turns of an ideal searching agent with their simulated tool results, rendered as the
chat messages an actor shows the model (`episode_messages`) and as the very trajectory an actor would record if its
engine generated exactly those turns (`oracle_trajectory`): the warm start trains on these. data/oracle.py writes
the episodes of the synthetic world.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from episode import prompts
from episode.tokenizer import EpisodeTokenizer, expand_placeholders
from protocol import Trajectory, from_ndarray, to_ndarray
from protocol.images import image_size


@dataclass(frozen=True)
class SearchHit:
    title: str
    text: str
    image: bytes | None  # PNG thumbnail for image hits, None for text hits


@dataclass(frozen=True)
class OracleTurn:
    assistant: str  # the whole assistant turn, tags included
    tool: str | None  # IMAGE_SEARCH | TEXT_SEARCH after a search call, None after the final answer
    results: tuple[SearchHit, ...] = ()


@dataclass(frozen=True)
class OracleEpisode:
    question_id: str
    kind: str
    question: str  # as shown to the model (with the fresh name when swapped)
    image: bytes
    answer: str  # the answer the turns end with (the fresh name for a swapped name question)
    turns: tuple[OracleTurn, ...]
    fresh_names: bool
    hint: str | None = None  # the workflow hint the first user turn shows (prompts.HINTS), if any

    @property
    def searches(self) -> int:
        return sum(t.tool is not None for t in self.turns)


def episode_messages(episode: OracleEpisode, fmt: prompts.PromptFormat = prompts.DEFAULT_FORMAT
                     ) -> tuple[list[dict], list[bytes]]:
    """HF chat messages of `episode` as an actor shows them in prompt format `fmt`, and its images in message
    order."""
    messages = [fmt.first_user_message(episode.question, episode.hint)]
    images = [episode.image]
    for turn in episode.turns:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.assistant}]})
        if turn.tool is not None:
            messages.append(fmt.information_message(
                [(hit.title, hit.text, hit.image is not None) for hit in turn.results]))
            images.extend(hit.image for hit in turn.results if hit.image is not None)
    return messages, images


def trajectory_length(trajectory: Trajectory) -> int:
    return int(from_ndarray(trajectory.token_ids).shape[0])


def oracle_trajectory(tok: EpisodeTokenizer, episode: OracleEpisode) -> Trajectory:
    """First prompt, then per turn the generated tokens (loss mask 1) and the tool-result continuation (mask 0);
    behaviour log-probs 0 and versions -1 (nothing was sampled), reward 1 (the oracle is right)."""
    def expanded(ids: list[int], images: list[bytes]) -> list[int]:
        return expand_placeholders(ids, tok.image_pad_id, [tok.image_tokens_of_size(*image_size(b)) for b in images])

    images = [episode.image]
    ids = expanded(tok.first_prompt(episode.question, episode.hint), images)
    mask = [0] * len(ids)
    searches = {"image_search": 0, "text_search": 0}
    for turn in episode.turns:
        generated = tok.tokenizer.encode(turn.assistant, add_special_tokens=False)
        if tok.forbidden_ids.intersection(generated):
            raise ValueError(f"oracle turn of {episode.question_id} holds a vision placeholder: {turn.assistant!r}")
        ids += generated
        mask += [1] * len(generated)
        if turn.tool is not None:
            searches[turn.tool] += 1
            shown = [(hit.title, hit.text, hit.image is not None) for hit in turn.results]
            new = [hit.image for hit in turn.results if hit.image is not None]
            piece = expanded(tok.continuation(shown), new)
            ids += piece
            mask += [0] * len(piece)
            images += new
    n = len(ids)
    return Trajectory(token_ids=to_ndarray(np.asarray(ids, np.int32)), loss_mask=to_ndarray(np.asarray(mask, np.uint8)),
                      behaviour_logprobs=to_ndarray(np.zeros(n, np.float32)),
                      versions=to_ndarray(np.full(n, -1, np.int32)), images=images, reward=1.0,
                      image_searches=searches["image_search"], text_searches=searches["text_search"],
                      num_turns=len(episode.turns), finish_reason="answer")
