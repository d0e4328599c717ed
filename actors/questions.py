"""The questions a rollout actor plays: read from a questions parquet (the world's or a converted dataset), and an
endless seeded order over them (a fresh shuffle each epoch).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from actors.episode import Question


def load_questions(path: str | Path, split: str | None = "train",
                   labels: Sequence[str] | None = None) -> list[Question]:
    """Questions of `split` from a questions parquet (id, image, question, answer, aliases[, kind, search_label,
    split]); every row when the file has no split column or `split` is None; only those whose search_label is in
    `labels` when given (ValueError when the file has no search_label column)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = {"id", "image", "question", "answer", "aliases"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: questions parquet lacks columns {sorted(missing)}")
    rows = table.to_pylist()
    if split is not None and "split" in table.column_names:
        rows = [r for r in rows if r["split"] == split]
    if labels is not None:
        if "search_label" not in table.column_names:
            raise ValueError(f"{path}: no search_label column to keep only labels {list(labels)}")
        rows = [r for r in rows if r["search_label"] in set(labels)]
    if not rows:
        raise ValueError(f"{path}: no questions of split {split!r}"
                         + (f" with search labels {list(labels)}" if labels is not None else ""))
    return [Question(id=str(r["id"]), question=r["question"], answer=r["answer"], aliases=list(r["aliases"] or []),
                     image=r["image"], kind=r.get("kind") or "", search_label=r.get("search_label") or "")
            for r in rows]


class QuestionOrder:
    """A seeded endless order over the questions: each epoch a fresh shuffle."""

    def __init__(self, questions: list[Question], seed: int) -> None:
        self._questions = questions
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.epoch = -1

    def next(self) -> Question:
        if not self._order:
            self._order = list(range(len(self._questions)))
            self._rng.shuffle(self._order)
            self._order.reverse()  # pop() from the end keeps the shuffled order
            self.epoch += 1
        return self._questions[self._order.pop()]
