"""A learner checkpoint (DCP, the learner's layout) exported onto its base model as a Hugging Face folder: the
weights equal the checkpoint's, the base folder's tokenizer and chat template come along; finding the newest
checkpoint in a checkpoints folder."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from learner.checkpoint import export_checkpoint, find_checkpoint


def test_a_learner_checkpoint_exports_to_a_loadable_model_folder(small_tiny, tmp_path):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForImageTextToText

    from learner.checkpoint import STATE_FILE

    model = AutoModelForImageTextToText.from_pretrained(small_tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # "trained" weights that differ from the base folder's
    step = tmp_path / "checkpoints" / "step_00000003"
    with warnings.catch_warnings():  # single-process save: DCP warns that no process group exists
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict(), "optim": {}}, checkpoint_id=str(step))  # the learner's layout
    (step / STATE_FILE).write_text("{}")
    assert find_checkpoint(tmp_path / "checkpoints") == step  # a root means its newest checkpoint
    assert find_checkpoint(step) == step
    with pytest.raises(FileNotFoundError, match="neither a learner checkpoint"):
        find_checkpoint(tmp_path)

    out = export_checkpoint(step, small_tiny, tmp_path / "exported")
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert json.loads((out / "forage_checkpoint.json").read_text())["checkpoint"] == str(step)
