"""hf_rlion.complete_checkpoints: which checkpoint folders count as complete, and what --resume_from_checkpoint means.

Proven here: ``last``/``latest``/``true`` pick the newest folder that carries the marker and skip a
newer interrupted one; a fresh start for ``None``/``false``; a clear error for a missing folder or when
every folder is incomplete; ``MarkCompleteCheckpoints.on_save`` writes the marker into the folder
Trainer just saved, and only on the process that saves. (End to end, with real kills, in
tests/test_crash_resume.py.)
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from hf_rlion.complete_checkpoints import CHECKPOINT_COMPLETE, MarkCompleteCheckpoints, complete_checkpoints, resolve_checkpoint


def test_resume_from_checkpoint_values(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint-\\* folder"):
        resolve_checkpoint("true", str(tmp_path))
    for step in (5, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # a save interrupted by a crash: no marker
    for value in ("last", "latest", "true"):
        assert resolve_checkpoint(value, str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert complete_checkpoints(tmp_path) == [str(tmp_path / "checkpoint-5"), str(tmp_path / "checkpoint-12")]
    assert resolve_checkpoint(None, str(tmp_path)) is None and resolve_checkpoint("false", str(tmp_path)) is None
    with pytest.raises(ValueError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "checkpoint-99"), str(tmp_path))
    only_partial = tmp_path / "other"
    (only_partial / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="checkpoint-3 is incomplete"):
        resolve_checkpoint("last", str(only_partial))


def test_mark_complete_checkpoints_marks_the_saved_folder_on_the_saving_process(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    state = SimpleNamespace(global_step=7, epoch=1.5)
    MarkCompleteCheckpoints().on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, None)
    assert complete_checkpoints(tmp_path) == []  # not the main process: no marker
    MarkCompleteCheckpoints().on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True), state, None)
    assert json.loads((tmp_path / "checkpoint-7" / CHECKPOINT_COMPLETE).read_text()) == {"global_step": 7, "epoch": 1.5}
