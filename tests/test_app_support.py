"""The apps' support module without running an app."""

from __future__ import annotations

import pytest

from ssdlit.apps.common import UsageError, checkpoint_path


def test_a_run_folder_stands_for_its_best_then_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"best\.ckpt or checkpoints/last\.ckpt"):
        checkpoint_path(run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert checkpoint_path(run) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    assert checkpoint_path(run) == run / "checkpoints" / "best.ckpt"
    assert checkpoint_path(run / "checkpoints" / "last.ckpt") == run / "checkpoints" / "last.ckpt"
    with pytest.raises(UsageError, match="not found"):
        checkpoint_path(tmp_path / "nothing.ckpt")
