"""benchmarks/gpu.py without a GPU: it says it needs CUDA and exits 0; its parts run on a CPU.

The GPU measurement itself (and its ``--check-syncs``) only runs on a CUDA machine; here
the script's command line, data and model building and one step of each side are
checked on the CPU, so that the one run on a GPU does not fail on a typo.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="with CUDA the script runs the real benchmark"
)


def load_gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu():
    return load_gpu_benchmark()


@no_cuda
@pytest.mark.parametrize("args", [[], ["--check-syncs"], ["--quick"]])
@pytest.mark.e2e  # the script in a fresh process, as a user runs it
def test_without_cuda_it_says_so_and_exits_0(args):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stdout
    assert "nothing measured" in proc.stdout


def test_arguments(gpu):
    args = gpu.parse_args([])
    assert (args.batch, args.device, args.check_syncs, args.channels_last) == (
        32,
        "cuda",
        False,
        True,
    )
    assert (args.warmup, args.repeats) == (5, 20)
    quick = gpu.parse_args(["--quick"])
    assert (quick.warmup, quick.repeats) == (2, 5)
    assert gpu.iterations(quick, "infer_b1") == (4, 15)  # batch 1 gets more iterations
    cpu = gpu.parse_args(["--device", "cpu"])
    assert (cpu.batch, cpu.warmup, cpu.repeats) == (2, 0, 1)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--batch", "0"])


def test_random_batch(gpu):
    batch = gpu.make_batch(16, seed=3, device=torch.device("cpu"))
    assert batch.images.shape == (16, 3, 300, 300) and batch.images.dtype == torch.uint8
    counts = batch.gt_mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 8
    labels = batch.gt_labels[batch.gt_mask]
    assert labels.min() >= 1 and labels.max() <= 20
    assert (batch.gt_labels[~batch.gt_mask] == 0).all()
    boxes = batch.gt_boxes[batch.gt_mask]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    for i, target in enumerate(batch.targets):  # torchvision's: the same boxes in pixels
        torch.testing.assert_close(target["boxes"], batch.gt_boxes[i, batch.gt_mask[i]] * 300)
        assert torch.equal(target["labels"], batch.gt_labels[i, batch.gt_mask[i]])
    again = gpu.make_batch(16, seed=3, device=torch.device("cpu"))
    assert torch.equal(again.images, batch.images) and torch.equal(again.gt_boxes, batch.gt_boxes)
    floats = gpu.as_float_list(batch.images[:2])
    assert len(floats) == 2 and floats[0].shape == (3, 300, 300)
    assert floats[0].dtype == torch.float32 and floats[0].min() >= 0 and floats[0].max() <= 1


def test_ssdlit_model_is_the_ssd300_voc_experiments(gpu):
    spec = gpu.experiment_spec()
    assert spec["backbone"] == {"name": "vgg16_ssd300", "pretrained": False}
    assert spec["image_size"] == [300, 300]
    assert spec["matcher"]["name"] == "ssd" and spec["head"]["name"] == "ssd"
    assert spec["postprocess"]["name"] == "per_class"
    assert spec["postprocess"]["nms_max_output_size"] == 400


@pytest.mark.slow
@pytest.mark.e2e  # the whole script's main, one iteration of every measurement
def test_debug_run_on_the_cpu(gpu, capsys):
    """``--device cpu --quick``: one iteration of every measurement at batch 1 (~25 s)."""
    assert gpu.main(["--device", "cpu", "--quick", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu"
    assert result["device"].startswith("cpu") and "not a GPU measurement" in result["device"]
    for key in ("train_ips", "infer_ips_b1"):
        assert result[f"ssdlit_{key}"] > 0 and result[f"torchvision_{key}"] > 0
    for key in ("training_ratio", "inference_ratio", "inference_ratio_b1"):
        assert result[key] > 0
    assert result["syncs"] is None  # a CUDA check
    assert "training b=1" in out and "inference b=1" in out
