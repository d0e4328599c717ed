"""Eval and curate without a learner: the no-search variant of the actor config, the whole curate path with a
scripted engine and fake image search, and which model a checkpoint is exported onto (the export itself:
tests/learner/test_learner_checkpoint_export.py)."""
from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq

from launcher.offline import curate, curate_table, without_search
from testkit import solid_png


def test_without_search_disallows_every_search_and_keeps_the_rest():
    from actors.config import ActorConfig

    cfg = ActorConfig.from_dict({"episode": {"max_image_searches": 2, "max_turns": 3}, "max_concurrency": 5})
    blind = without_search(cfg)
    assert (blind.episode.max_image_searches, blind.episode.max_text_searches) == (0, 0)
    assert blind.episode.on_search_over_limit == "inform" and blind.episode.max_turns == 3
    assert blind.max_concurrency == 5 and cfg.episode.max_image_searches == 2  # the original is untouched


class SearchThenAnswerEngine:
    """Turn 1 always searches the image. After real hits it answers "blue"; after the "search limit" notice it
    answers "red". So blue questions need search, red ones do not, green ones are never solved."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.version = 0

    def _ids(self, text: str) -> list[int]:
        return self.tok.tokenizer.encode(text, add_special_tokens=False)

    async def generate(self, request):
        from actors.engine import TurnOutput
        from episode.prompts import SEARCH_LIMIT

        prompt = self.tok.tokenizer.decode(request.prompt_token_ids)
        if "title: thing" in prompt:
            text = "<reason> found it </reason><answer> blue </answer>"
        elif SEARCH_LIMIT[:20] in prompt:
            text = "<reason> my guess </reason><answer> red </answer>"
        else:
            text = "<reason> let me look </reason><search><img></search>"
        tokens = self._ids(text)
        expanded = []
        for t in request.prompt_token_ids:
            expanded.extend([t] * (4 if t == self.tok.image_pad_id else 1))
        return TurnOutput(prompt_token_ids=expanded, token_ids=tokens, logprobs=[-0.1] * len(tokens),
                          versions=[0] * len(tokens), finish_reason="stop")


class ImageSearch:
    def __init__(self) -> None:
        self.calls = 0

    async def call(self, tool, args, deadline_s=None):
        from protocol import ToolItem, ToolReply

        self.calls += 1
        return ToolReply(id="x", ok=True, items=[ToolItem(title="thing one", url="u", image=solid_png((0, 0, 255)))])


def test_curate_labels_from_runs_with_and_without_search(tiny_model_dir, tmp_path):
    from episode.tokenizer import EpisodeTokenizer

    rows = [{"id": f"{answer}{i}", "image": solid_png((40 * i, 80, 80)), "question": "what colour is it?",
             "answer": answer, "aliases": [], "kind": "test", "search_label": "", "split": "train"}
            for answer in ("red", "blue", "green") for i in range(2)]
    data = tmp_path / "questions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    tok = EpisodeTokenizer.from_pretrained(tiny_model_dir)
    search = ImageSearch()
    actor_cfg = {"actors": {"max_concurrency": 4, "sampling": {"temperature": 1.0}}, "algo": {"group_size": 1}}
    curation = {"k": 3, "free_min_acc": 0.5, "required_min_acc": 0.25, "free_fraction": 0.5, "seed": 0}
    summary = asyncio.run(curate(str(tiny_model_dir), str(data), str(tmp_path / "out"), {"image_search": search},
                                 actor_cfg, curation, split="train", engine=SearchThenAnswerEngine(tok),
                                 tokenizer=tok))
    assert search.calls == 6 * 3  # only the with-search runs call the tool, k per question
    labels = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "labels.parquet").to_pylist()}
    assert {labels[f"red{i}"]["curated_label"] for i in range(2)} == {"search_free"}
    assert {labels[f"blue{i}"]["curated_label"] for i in range(2)} == {"search_required"}
    assert {labels[f"green{i}"]["curated_label"] for i in range(2)} == {"unsolved"}
    assert labels["blue0"]["acc_with_search"] == 1.0 and labels["blue0"]["acc_without_search"] == 0.0
    assert labels["red0"]["runs"] == 3
    assert summary["labels"] == {"search_free": 2, "search_required": 2, "unsolved": 2} and summary["balanced"] == 4
    balanced = pq.read_table(tmp_path / "out" / "balanced.parquet").to_pylist()
    assert sorted(r["id"] for r in balanced) == ["blue0", "blue1", "red0", "red1"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["k"] == 3
    assert "| balanced subset | 4 |" in curate_table(summary)


def test_a_checkpoint_is_exported_onto_the_model_its_run_trained_from(tiny_model_dir, tmp_path):
    from launcher.run_folder import RUN_MODEL_FILE, base_model_of

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    assert base_model_of(step, "/models/default") == "/models/default"  # no record: this launch's model
    (tmp_path / "run" / RUN_MODEL_FILE).write_text(json.dumps({"model_path": str(tiny_model_dir)}))
    assert base_model_of(step, "/models/default") == str(tiny_model_dir)
    (tmp_path / "run" / RUN_MODEL_FILE).write_text(json.dumps({"model_path": str(tmp_path / "deleted")}))
    assert base_model_of(step, "/models/default") == "/models/default"  # the recorded model is gone
