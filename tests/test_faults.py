"""Faults: exact resume, a NaN loss stops the run, atomic checkpoints.

The training runs go through the real command line (``python -m ssdlit.train``) with a tiny
synthetic dataset (16 training images of 64x64, batch 4: 4 steps per epoch) on the CPU in
deterministic mode (``trainer=cpu``).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssdlit.training.builders import build_trainer
from ssdlit.training.checkpoint import AtomicCheckpointIO, atomic_torch_save, load_checkpoint

#: Runs through the command line or a real Trainer: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

STEPS_PER_EPOCH = 4  # 16 training images, batch 4, drop_last


#: The tiny run (tests/conftest.py) with the components these tests were written against,
#: whatever the demo selects, deterministic on the CPU, 4 steps per epoch, no evaluation.
FAULTS = (
    "backbone=ssd7",
    "anchors=ssd7",
    "augment=ssd",
    "optim=sgd",
    "trainer=cpu",  # deterministic algorithms on the CPU
    "evaluate.val=false",
    "evaluate.test=false",
    "optim.lr=1e-2",
    "optim.scheduler.warmup_steps=2",
)


def start_train(overrides: list[str], run_dir: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "ssdlit.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(overrides: list[str], run_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    done = finish(start_train(overrides, run_dir, cwd))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def tensors(obj, prefix=""):
    """``{path: tensor}`` of every tensor in a nested checkpoint structure."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


# -- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1], ids=["main_process", "one_worker"])
def test_resume_from_last_equals_an_uninterrupted_run(tmp_path: Path, workers: int, tiny) -> None:
    """Run A: 2 epochs. Run B: 1 epoch, then ``ckpt_path=last`` up to 2 epochs in the same run
    folder. Both end with the same weights, optimiser state and schedule, bit for bit, with
    the data loaded in the main process and by a worker process (whose augmentation seed
    and first indices come with the iterator Lightning makes before the epoch starts)."""
    data = tmp_path / "data"
    run_a, run_b = tmp_path / "A", tmp_path / "B"

    def overrides(*more: str) -> list[str]:
        return tiny.run(data, *FAULTS, f"data.num_workers={workers}", *more)

    a = start_train(overrides("trainer.max_epochs=2"), run_a, tmp_path)
    b1 = start_train(overrides("trainer.max_epochs=1"), run_b, tmp_path)
    for proc in (a, b1):
        done = finish(proc)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last_b = run_b / "checkpoints" / "last.ckpt"
    after_one = torch.load(last_b, weights_only=True, map_location="cpu")
    assert after_one["global_step"] == STEPS_PER_EPOCH

    resumed = train(overrides("trainer.max_epochs=2", "ckpt_path=last"), run_b, tmp_path)
    assert (
        f"Restoring states from the checkpoint path at {last_b}" in resumed.stderr + resumed.stdout
    )

    ckpt_a = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    ckpt_b = torch.load(last_b, weights_only=True, map_location="cpu")
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 2 * STEPS_PER_EPOCH
    assert ckpt_a["epoch"] == ckpt_b["epoch"]

    # The second epoch changed the weights (so equality below means something) ...
    moved = [
        k for k, v in after_one["state_dict"].items() if not torch.equal(v, ckpt_a["state_dict"][k])
    ]
    assert len(moved) > len(after_one["state_dict"]) // 2
    # ... and the resumed run changed them exactly as the uninterrupted one did.
    sd_a, sd_b = ckpt_a["state_dict"], ckpt_b["state_dict"]
    assert sd_a.keys() == sd_b.keys()
    different = {
        k: float((sd_a[k].double() - sd_b[k].double()).abs().max())
        for k in sd_a
        if not torch.equal(sd_a[k], sd_b[k])
    }
    assert not different, f"weights differ after resume (max abs diff per tensor): {different}"
    # Optimiser (momentum buffers) and learning-rate schedule continue too.
    opt_a, opt_b = tensors(ckpt_a["optimizer_states"]), tensors(ckpt_b["optimizer_states"])
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert ckpt_a["lr_schedulers"] == ckpt_b["lr_schedulers"]


# -- NaN / inf loss -------------------------------------------------------------------------


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny
) -> None:
    """The schedule multiplies the learning rate by 1e30 at the first step of epoch 1: the
    weights explode and the loss turns NaN/inf a step or two later. The run exits with
    status 1 and a one-line message (no traceback) naming the step and the loss, the log
    file has it too, and last.ckpt (end of epoch 0) is intact, loadable and finite."""
    run_dir = tmp_path / "run"
    overrides = tiny.run(
        tmp_path / "data",
        *FAULTS,
        "trainer.max_epochs=3",
        f"optim.scheduler.milestones=[{STEPS_PER_EPOCH}]",
        "optim.scheduler.gamma=1e30",
    )
    done = finish(start_train(overrides, run_dir, tmp_path))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    err = done.stderr
    assert "Traceback" not in err, err[-3000:]
    match = re.search(
        r"ssdlit\.train: non-finite training loss at epoch (\d+), global step (\d+) \(loss=(\S+?),",
        err,
    )
    assert match, err[-3000:]
    epoch, step, loss = int(match[1]), int(match[2]), float(match[3])
    assert epoch >= 1 and step >= STEPS_PER_EPOCH and not math.isfinite(loss)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint is {last}" in err
    log_text = (run_dir / "train.log").read_text()
    assert f"global step {step}" in log_text and "non-finite training loss" in log_text
    assert not (run_dir / "metrics.json").exists()  # the run stopped: no evaluation

    ckpt = load_checkpoint(last)  # weights_only=True
    assert ckpt["global_step"] == STEPS_PER_EPOCH  # the end of epoch 0, the last good state
    for name, value in tensors(ckpt["state_dict"]).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert not list(last.parent.glob(".*.tmp"))


# -- atomic checkpoints ---------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "epoch": int(value)}


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    """A write that fails half-way (disk full, an exception) keeps the old file as it was."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_state(1.0), path)
    before = path.read_bytes()

    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):  # write part of the bytes, then fail
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ssdlit.training.checkpoint.torch.save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 1
    assert torch.equal(loaded["state_dict"]["w"], _state(1.0)["state_dict"]["w"])
    # The temporary file is gone.
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_process_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    """SIGKILL after the new checkpoint's bytes are written but before the rename: the old
    last.ckpt survives whole (only a stray temporary file is left). The writer is a fresh
    Python process (forking this multi-threaded one could deadlock)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(256, 256)}, path)
    child = textwrap.dedent(
        f"""
        import os, signal, torch
        from ssdlit.training.checkpoint import atomic_torch_save
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        atomic_torch_save({{"epoch": 2, "w": torch.zeros(256, 256)}}, {str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.ones(256, 256))
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers, "the kill should have left the partial temporary file behind"
    assert all(p.name.startswith(".last.ckpt.") and p.suffix == ".tmp" for p in leftovers)


def test_atomic_save_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"v": torch.tensor(1)}, path)
    atomic_torch_save({"v": torch.tensor(2)}, path)
    assert int(load_checkpoint(path)["v"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


class _NotATensor:
    pass


def test_checkpoints_are_read_with_weights_only(tmp_path: Path) -> None:
    """Both readers refuse pickled objects (weights_only=True), by default."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)


def test_the_trainer_writes_checkpoints_through_the_atomic_io(tmp_path: Path) -> None:
    trainer = build_trainer(
        {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}, tmp_path
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
