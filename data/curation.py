"""Search balancing (MMSearch-R1): label each question `search_required` or `search_free` from how often the policy
answers it correctly in k runs with search allowed and k runs without, then pick a balanced subset.

    acc_without >= free_min_acc                                  -> search_free      (answerable from the image)
    else acc_with >= required_min_acc and acc_with > acc_without -> search_required  (search is what makes it work)
    else                                                         -> unsolved         (no signal; left out)

The subset keeps a `free_fraction` share of search_free questions (0.5 = 1:1, as in the paper) and as many
questions as both labels allow, drawn with a seeded RNG. Pure logic plus the parquet writers; the runs themselves
are played by launcher/offline.py with actors' eval.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LABELS = ("search_free", "search_required", "unsolved")


@dataclass(frozen=True)
class CurationConfig:
    k: int = 8  # runs per question with search, and as many without
    free_min_acc: float = 0.5  # correct without search in at least this share of runs -> search_free
    required_min_acc: float = 0.125  # correct with search in at least this share (and more than without) -> required
    free_fraction: float = 0.5  # share of search_free questions in the balanced subset
    seed: int = 0  # subset sampling

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"curate k must be >= 1, got {self.k}")
        for name in ("free_min_acc", "required_min_acc"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"curate {name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.free_fraction < 1.0:
            raise ValueError(f"curate free_fraction must be in (0, 1), got {self.free_fraction}")


def label_question(acc_without: float, acc_with: float, cfg: CurationConfig) -> str:
    """The label of one question from its two accuracies (shares of correct runs)."""
    if acc_without >= cfg.free_min_acc:
        return "search_free"
    if acc_with >= cfg.required_min_acc and acc_with > acc_without:
        return "search_required"
    return "unsolved"


def accuracy_by_question(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, float]]:
    """{question id: (runs, share correct)} from eval sample rows (id, correct)."""
    runs: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        runs[str(row["id"])].append(bool(row["correct"]))
    return {qid: (len(c), sum(c) / len(c)) for qid, c in runs.items()}


def label_questions(with_search: Iterable[Mapping[str, Any]], without_search: Iterable[Mapping[str, Any]],
                    cfg: CurationConfig) -> list[dict[str, Any]]:
    """One record per question: id, runs, acc_with_search, acc_without_search, curated_label. Both run sets must
    cover the same questions (a question missing from one is a ValueError naming it)."""
    acc_with, acc_without = accuracy_by_question(with_search), accuracy_by_question(without_search)
    if set(acc_with) != set(acc_without):
        missing = sorted(set(acc_with) ^ set(acc_without))[:5]
        raise ValueError(f"with- and without-search runs cover different questions, e.g. {missing}")
    records = []
    for qid in acc_with:
        (n_with, a_with), (n_without, a_without) = acc_with[qid], acc_without[qid]
        records.append({"id": qid, "runs": min(n_with, n_without), "acc_with_search": a_with,
                        "acc_without_search": a_without, "curated_label": label_question(a_without, a_with, cfg)})
    return records


def balanced_subset(records: Sequence[Mapping[str, Any]], cfg: CurationConfig) -> list[str]:
    """Ids of the balanced subset: as many questions as possible with a `free_fraction` share of search_free
    (empty when either label has no question); sorted for a stable file."""
    by_label = {label: sorted(r["id"] for r in records if r["curated_label"] == label) for label in LABELS}
    free, required = by_label["search_free"], by_label["search_required"]
    if not free or not required:
        return []
    total = min(len(free) / cfg.free_fraction, len(required) / (1.0 - cfg.free_fraction))
    n_free = max(1, math.floor(total * cfg.free_fraction + 1e-9))
    n_required = max(1, math.floor(total * (1.0 - cfg.free_fraction) + 1e-9))
    rng = random.Random(cfg.seed)
    return sorted(rng.sample(free, min(n_free, len(free))) + rng.sample(required, min(n_required, len(required))))


def write_curated(questions_parquet: str | Path, records: Sequence[Mapping[str, Any]], subset: Sequence[str],
                  out_dir: str | Path) -> dict[str, Path]:
    """labels.parquet (every question's accuracies and label) and balanced.parquet (the subset's question rows,
    all original columns, `search_label` replaced by the curated label: a questions parquet actors read)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels_path, balanced_path = out / "labels.parquet", out / "balanced.parquet"
    pq.write_table(pa.Table.from_pylist(list(records)), labels_path)
    table = pq.read_table(str(questions_parquet))
    table = table.filter(pc.is_in(table["id"], value_set=pa.array(list(subset), type=table["id"].type)))
    label_of = {r["id"]: r["curated_label"] for r in records}
    labels = pa.array([label_of[qid] for qid in table["id"].to_pylist()], type=pa.string())
    if "search_label" in table.column_names:
        table = table.set_column(table.column_names.index("search_label"), "search_label", labels)
    else:
        table = table.append_column("search_label", labels)
    pq.write_table(table, balanced_path)
    return {"labels": labels_path, "balanced": balanced_path}
