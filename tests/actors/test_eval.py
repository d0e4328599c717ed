"""Eval mode with a scripted engine: per-sample rows, the aggregate table (hand-computed), the output files, and
the `python -m actors eval` command line."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors import __main__ as cli
from actors import engine as engine_module
from actors.engine import TurnOutput
from actors.eval import aggregate, eval_dataset, format_table
from actors_helpers import FakeTools, solid_image
from protocol.images import encode_png

# per question: its kind, label, answer, and the assistant turns the scripted policy plays
SCRIPT = {
    "q0": ("pixels", "search_free", "red", ["<reason> a </reason><answer> red </answer>"]),
    "q1": ("image_search", "search_required", "star", ["<reason> a </reason><search><img></search>",
                                                       "<reason> b </reason><answer> star </answer>"]),
    "q2": ("text_search", "search_required", "river", ["<reason> a </reason><text_search> where </text_search>",
                                                       "<reason> b </reason><answer> town </answer>"]),
    "q3": ("pixels", "search_free", "blue", ["<reason> a </reason><search><img></search>",
                                             "<reason> b </reason><answer> blue </answer>"]),
}


def _write(path):
    rows = [{"id": qid, "image": encode_png(solid_image((10 * i, 20, 30))), "question": f"question {qid}",
             "answer": answer, "aliases": [], "kind": kind, "search_label": label, "split": "test"}
            for i, (qid, (kind, label, answer, _)) in enumerate(SCRIPT.items())]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class ScriptEngine:
    """Plays SCRIPT: request ids are eval-<index>-t<turn>, in question order."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.version = 0
        self.started = self.closed = False

    async def start(self):
        self.started = True

    async def close(self):
        self.closed = True

    async def generate(self, request):
        _, index, turn = request.request_id.split("-")
        text = list(SCRIPT.values())[int(index)][3][int(turn[1:])]
        ids = self.tok.tokenizer.encode(text, add_special_tokens=False)
        expanded = []
        for t in request.prompt_token_ids:
            expanded.extend([t] * (4 if t == self.tok.image_pad_id else 1))
        return TurnOutput(prompt_token_ids=expanded, token_ids=ids, logprobs=[-0.1] * len(ids),
                          versions=[0] * len(ids), finish_reason="stop")


def test_eval_rows_table_and_files(tmp_path, episode_tokenizer, monkeypatch):
    import asyncio

    monkeypatch.setattr("tool_servers.client.ToolClient", lambda *a, **k: FakeTools())
    data = _write(tmp_path / "q.parquet")
    summary = asyncio.run(eval_dataset("unused", data, tmp_path / "out", {"image_search": ["x"],
                                                                           "text_search": ["y"]},
                                       engine=ScriptEngine(episode_tokenizer), tokenizer=episode_tokenizer))
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert [r["prediction"] for r in rows] == ["red", "star", "town", "blue"]
    assert [(r["image_searches"], r["text_searches"], r["turns"]) for r in rows] == [(0, 0, 1), (1, 0, 2),
                                                                                     (0, 1, 2), (1, 0, 2)]
    assert [r["reward"] for r in rows] == pytest.approx([1.0, 0.91, 0.1, 0.91])
    assert pq.read_table(tmp_path / "out" / "samples.parquet").num_rows == 4
    table = {row["group"]: row for row in summary["table"]}
    assert list(table) == ["all", "kind=pixels", "kind=image_search", "kind=text_search", "label=search_free",
                           "label=search_required"]
    everything = table["all"]  # 3 searches of 2 allowed x 4 samples
    assert (everything["n"], everything["accuracy"], everything["SR"]) == (4, 0.75, pytest.approx(3 / 8))
    assert (everything["SR_image"], everything["SR_text"], everything["searched"]) == (0.5, 0.25, 0.75)
    assert everything["reward"] == pytest.approx((1.0 + 0.91 + 0.1 + 0.91) / 4)
    free = table["label=search_free"]  # q0 (no search) and q3 (one image search): the search that was not needed
    assert (free["n"], free["accuracy"], free["SR"], free["searched"]) == (2, 1.0, 0.25, 0.5)
    needed = table["label=search_required"]
    assert (needed["accuracy"], needed["SR"], needed["searched"]) == (0.5, 0.5, 1.0)
    assert table["kind=pixels"]["SR"] == free["SR"]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["questions"] == 4 and saved["table"] == json.loads(json.dumps(summary["table"]))
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert markdown.startswith("| group | n | accuracy") and "| label=search_free | 2 | 1.000 |" in markdown


def test_an_outage_is_counted_apart_not_as_a_wrong_answer(tmp_path, episode_tokenizer, monkeypatch):
    """text search is down (a timeout): q2's episode is tool_failed; the table counts it (`tool_failed`) and keeps
    it out of accuracy and the other outcome rates, while `n` and `searched` still count every question."""
    import asyncio

    monkeypatch.setattr("tool_servers.client.ToolClient",
                        lambda *a, **k: FakeTools(fail=("text_search",), fail_code="timeout"))
    data = _write(tmp_path / "q.parquet")
    summary = asyncio.run(eval_dataset("unused", data, tmp_path / "out", {"image_search": ["x"],
                                                                           "text_search": ["y"]},
                                       engine=ScriptEngine(episode_tokenizer), tokenizer=episode_tokenizer))
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["tool_failed"] for r in rows] == [False, False, True, False]
    assert rows[2]["finish_reason"] == "tool_failed" and not rows[2]["correct"]
    table = {row["group"]: row for row in summary["table"]}
    everything = table["all"]
    assert (everything["n"], everything["tool_failed"], everything["accuracy"]) == (4, 1, 1.0)
    assert everything["searched"] == 0.75 and everything["tool_errors"] == 1  # q2 did decide to search
    assert everything["searches"] == pytest.approx(2 / 3) and everything["turns"] == pytest.approx(5 / 3)
    needed = table["label=search_required"]
    assert (needed["n"], needed["tool_failed"], needed["accuracy"]) == (2, 1, 1.0)
    assert table["kind=text_search"]["tool_failed"] == 1 and table["kind=text_search"]["accuracy"] == 0.0
    assert summary["tool_failed"] == 1
    assert "| label=search_required | 2 | 1.000 |" in (tmp_path / "out" / "summary.md").read_text()


def test_aggregate_without_searches_allowed():
    rows = [{"kind": "", "search_label": "", "correct": True, "reward": 1.0, "format": 1.0, "image_searches": 0,
             "text_searches": 0, "searches": 0, "turns": 1, "tool_errors": 0}]
    table = aggregate(rows, 0, 0)
    assert [r["group"] for r in table] == ["all", "kind=-", "label=-"] and table[0]["SR"] == 0.0
    assert "| all | 1 | 1.000 |" in format_table(table)


def test_command_line_runs_eval_end_to_end(tmp_path, tiny_model_dir, episode_tokenizer, monkeypatch, capsys):
    made = []

    def fake_engine(model_path, cfg, run_dir, **kwargs):
        made.append((model_path, cfg, kwargs))
        made.append(ScriptEngine(episode_tokenizer))
        return made[-1]

    monkeypatch.setattr(engine_module, "VllmEngine", fake_engine)
    data = _write(tmp_path / "q.parquet")
    conf = tmp_path / "actors.yaml"
    conf.write_text("episode:\n  max_turns: 3\n  max_text_searches: 0\nsampling:\n  temperature: ${algo.temperature}\n"
                    "cache_dir: ${run.cache_dir}\n")
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                     "--limit", "3", "--split", "test", "--actors-conf", str(conf), "--cache-dir",
                     str(tmp_path / "cache")])
    assert code == 0 and made[1].started and made[1].closed
    cfg, kwargs = made[0][1], made[0][2]
    assert kwargs["max_images"] == 1 + 1 * 3 and kwargs["cache_dir"] == str(tmp_path / "cache")
    out = capsys.readouterr().out
    assert "| all | 3 |" in out and "3 questions" in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    # text search is not allowed by the conf: q2's text search ends its episode; no tool servers were given
    assert rows[2]["finish_reason"] == "text_search_limit" and rows[1]["tool_errors"] == 1
    assert rows[1]["tool_failed"] and "tool_failed" in out  # no client for image_search: an outage, not a miss


def test_command_line_arguments():
    assert cli.parse_tools(["image_search=tcp://127.0.0.1:1,tcp://127.0.0.1:2", "text_search=tcp://127.0.0.1:3"]) \
        == {"image_search": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], "text_search": ["tcp://127.0.0.1:3"]}
    with pytest.raises(ValueError, match="TOOL=ENDPOINT"):
        cli.parse_tools(["image_search"])
    cfg = cli.actors_conf(None, 0.5, "/c")
    assert cfg == {"sampling": {"temperature": 0.5}, "cache_dir": "/c"}
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "m"])  # --data and --out are required


def test_eval_modes_force_the_workflows_of_the_baselines():
    from actors.episode import Question
    from actors.eval import KIND_WORKFLOWS, RAG_WORKFLOW, heldout_questions, workflow_for

    def q(kind, label="search_free", qid="x"):
        return Question(id=qid, question="q", answer="a", aliases=[], image=b"", kind=kind, search_label=label)

    assert workflow_for("policy", q("pixels")) is None
    assert workflow_for("always_search", q("pixels")) == ("image_search", "text_search", "answer") == RAG_WORKFLOW
    assert workflow_for("never_search", q("image_text_search")) == ("answer",)
    assert workflow_for("workflow", q("pixels")) == ("answer",)
    assert workflow_for("workflow", q("image_text_search")) == ("image_search", "text_search", "answer")
    assert workflow_for("workflow", q("text_search")) == ("text_search", "answer") == KIND_WORKFLOWS["text_search"]
    with pytest.raises(ValueError, match="no workflow"):
        workflow_for("workflow", q("visual"))
    with pytest.raises(ValueError, match="unknown eval mode"):
        workflow_for("sometimes", q("pixels"))
    questions = [q("pixels", "search_free", "a"), q("pixels", "search_free", "b"), q("text_search", "search_required",
                 "c"), q("pixels", "search_free", "d"), q("text_search", "search_required", "e")]
    assert [x.id for x in heldout_questions(questions, 2)] == ["a", "b", "c", "e"]
    assert heldout_questions(questions, None) == questions
    with pytest.raises(ValueError, match="per_label"):
        heldout_questions(questions, 0)


def test_baselines_show_their_workflow_hint():
    from actors.episode import Question
    from actors.eval import hint_for

    def q(kind):
        return Question(id="x", question="q", answer="a", aliases=[], image=b"", kind=kind)

    assert hint_for("policy", q("pixels")) is None
    assert hint_for("always_search", q("text_search")) == "always_search"
    assert hint_for("never_search", q("image_search")) == "never_search"
    assert hint_for("workflow", q("pixels")) == "never_search" and hint_for("workflow", q("image_search")) is None
