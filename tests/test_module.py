"""DetectionModule, optimiser groups and schedules, metrics plumbing, callbacks and
atomic checkpoints: unit tests without the CLI (fast, no data on disk)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssdlit.config import plain
from ssdlit.metrics import DetectionEvaluator, batch_to_metric_inputs, format_ap_table
from ssdlit.module import DetectionModule
from ssdlit.training.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from ssdlit.training.checkpoint import AtomicCheckpointIO, atomic_torch_save, load_checkpoint
from ssdlit.training.optim import WarmupSchedule, build_scheduler, parameter_groups

CLASSES = ["circle", "square", "triangle"]


def tiny_module(**overrides) -> DetectionModule:
    torch.manual_seed(0)
    kwargs = dict(
        class_names=CLASSES,
        image_size=[64, 64],
        backbone={"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8]},
        anchors={
            "name": "ssd",
            "scales": [0.1, 0.2, 0.4, 0.7, 1.0],
            "aspect_ratios": [1.0, 2.0, 0.5],
        },
        head={"name": "ssd"},
        matcher={"name": "ssd"},
        postprocess={"name": "per_class", "top_k": 50},
        optim={
            "name": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "scheduler": {
                "name": "multistep",
                "warmup_steps": 10,
                "warmup_factor": 0.1,
                "milestones": [20, 30],
            },
        },
        metrics={"coco": True},
    )
    kwargs.update(overrides)
    return DetectionModule(**kwargs)


def tiny_batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(
        [[[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.9, 0.8]], [[0.2, 0.3, 0.4, 0.9], [0.0, 0.0, 0.0, 0.0]]]
    )[:b]
    labels = torch.tensor([[1, 3], [2, 0]])[:b]
    meta = [
        {
            "image_id": str(i),
            "path": "",
            "orig_size": (128, 256),
            "input_size": (64, 64),
            "scale": (0.25, 0.5),
            "offset": (0.0, 0.0),
        }
        for i in range(b)
    ]
    return {
        "images": torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=g),
        "boxes": boxes,
        "labels": labels,
        "mask": labels > 0,
        "difficult": torch.zeros_like(labels, dtype=torch.bool),
        "meta": meta,
    }


# -- optimiser ---------------------------------------------------------------------------


class _WithNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # weight: decay, bias: no decay
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_biases_and_norms():
    m = _WithNorms()
    groups = {g["name"]: g for g in parameter_groups(m, weight_decay=5e-4)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert decay == {id(m.conv.weight), id(m.lin.weight)}
    assert no_decay == {
        id(p)
        for p in (
            m.conv.bias,
            m.bn.weight,
            m.bn.bias,
            m.gn.weight,
            m.gn.bias,
            m.ln.weight,
            m.ln.bias,
        )
    }
    assert groups["decay"]["weight_decay"] == 5e-4 and groups["no_decay"]["weight_decay"] == 0.0
    one = parameter_groups(m, weight_decay=1e-4, no_decay_norm_and_bias=False)
    assert len(one) == 1 and len(one[0]["params"]) == 9  # the frozen layer is left out


def test_ssd300_l2norm_and_biases_are_not_decayed():
    from ssdlit.backbones import L2Norm

    module = tiny_module()
    groups = {g["name"]: g["params"] for g in parameter_groups(module, 5e-4)}
    no_decay = {id(p) for p in groups["no_decay"]}
    for name, p in module.named_parameters():
        is_norm_or_bias = name.endswith("bias") or ".bn." in name
        assert (id(p) in no_decay) == is_norm_or_bias, name
    norm = L2Norm(8)
    assert [
        id(p) for g in parameter_groups(norm, 5e-4) for p in g["params"] if g["name"] == "no_decay"
    ] == [id(norm.weight)]


def test_warmup_multistep_values():
    s = WarmupSchedule("multistep", warmup_steps=100, warmup_factor=0.001, milestones=[1000, 2000])
    assert s(0) == pytest.approx(0.001)
    assert s(50) == pytest.approx(0.001 + 0.999 * 0.5)
    assert s(100) == pytest.approx(1.0)
    assert s(999) == pytest.approx(1.0)
    assert s(1000) == pytest.approx(0.1)
    assert s(1999) == pytest.approx(0.1)
    assert s(2000) == pytest.approx(0.01)
    assert s(10**6) == pytest.approx(0.01)
    # The paper's SSD300 VOC07+12 schedule: x0.1 at 80k and 100k of 120k iterations.
    paper = WarmupSchedule("multistep", warmup_steps=500, milestones=[80000, 100000])
    assert [paper(k) for k in (79999, 80000, 100000, 119999)] == pytest.approx([1, 0.1, 0.01, 0.01])


def test_warmup_cosine_values():
    s = WarmupSchedule(
        "cosine", warmup_steps=10, warmup_factor=0.0, total_steps=110, min_factor=0.1
    )
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupSchedule("cosine")
    with pytest.raises(ValueError, match="unknown schedule"):
        WarmupSchedule("poly")


def test_scheduler_steps_the_learning_rate_and_state_is_plain():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        opt, {"name": "multistep", "warmup_steps": 4, "warmup_factor": 0.2, "milestones": [6]}, None
    )
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.1, 0.1])
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["milestones"] == [6]  # plain numbers: weights_only-safe
    with pytest.raises(ValueError, match="unknown scheduler option"):
        build_scheduler(opt, {"name": "multistep", "step_size": 3}, None)


def test_configure_optimizers_groups_and_schedule():
    module = tiny_module()
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1)  # warm-up starts at 0.1 x lr
    adamw = tiny_module(
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "scheduler": None}
    )
    opt2 = adamw.configure_optimizers()
    assert isinstance(opt2, torch.optim.AdamW)


# -- the module --------------------------------------------------------------------------


def test_the_default_optimiser_is_the_sgd_recipe_of_the_configs():
    """A module built without ``optim`` trains with conf/optim/sgd.yaml, the one place of
    that recipe (no copy of its values in the code)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    sgd = Path(__file__).resolve().parents[1] / "conf" / "optim" / "sgd.yaml"
    module = tiny_module(optim=None)
    recipe = OmegaConf.to_container(OmegaConf.load(sgd))
    assert module.hparams["optim"] == recipe
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == recipe["momentum"] > 0
    assert opt.param_groups[0]["weight_decay"] == recipe["weight_decay"] > 0


def test_the_detector_keys_are_those_of_detector_build():
    """``from_config`` takes the keys of ``Detector.build`` from the config (those it
    leaves out keep ``Detector.build``'s defaults, saved in the hyper-parameters)."""
    import inspect

    from ssdlit import Detector
    from ssdlit.module import DETECTOR_KEYS

    params = inspect.signature(Detector.build).parameters
    assert set(DETECTOR_KEYS) == set(params) - {"num_classes"}
    spec = {k: v for k, v in tiny_module().hparams.items() if k in DETECTOR_KEYS}
    spec.pop("clip_boxes")
    module = DetectionModule.from_config({**spec, "channels_last": True}, ["a", "b"])
    assert module.class_names == ["a", "b"] and module.hparams["channels_last"] is True
    assert module.hparams["clip_boxes"] == params["clip_boxes"].default
    assert module.detector.clip_boxes == params["clip_boxes"].default
    with pytest.raises(TypeError):
        DetectionModule(class_names=["a"], **spec, no_such_key=1)


def test_from_checkpoint_changes_postprocess_options_only(tmp_path):
    module = tiny_module()
    path = tmp_path / "m.ckpt"
    atomic_torch_save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path
    )
    again = DetectionModule.from_checkpoint(path, postprocess_options={"top_k": 7})
    assert again.hparams["postprocess"] == {**module.hparams["postprocess"], "top_k": 7}
    assert again.detector.postprocess.top_k == 7
    assert module.detector.postprocess.top_k == 50  # the saved option, for comparison
    other = DetectionModule.from_checkpoint(path, postprocess_options={"name": "global"})
    assert type(other.detector.postprocess).__name__ == "GlobalNMS"


def test_hparams_are_plain_and_classes_come_from_the_data():
    from omegaconf import OmegaConf

    module = tiny_module(backbone=OmegaConf.create({"name": "ssd7", "widths": [8] * 7}))
    assert module.detector.head.num_classes == len(CLASSES)
    assert type(module.hparams["backbone"]) is dict
    assert module.hparams["backbone"]["widths"] == [8] * 7
    assert plain(OmegaConf.create({"a": [1, (2, 3)]})) == {"a": [1, [2, 3]]}
    with pytest.raises(ValueError, match="derived"):
        tiny_module(head={"name": "ssd", "num_classes": 3})
    with pytest.raises(ValueError, match="empty"):
        tiny_module(class_names=[])


def test_training_and_validation_steps(monkeypatch):
    module = tiny_module()
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    monkeypatch.setattr(module, "log_dict", lambda d, **kw: logged.update(d))
    batch = tiny_batch()
    loss = module.training_step(batch, 0)
    assert loss.requires_grad and torch.isfinite(loss)
    assert {"train/loss", "train/loss_cls", "train/loss_box"} <= set(logged)
    loss.backward()
    module.eval()
    with torch.no_grad():
        dets = module.validation_step(batch, 0)
    assert len(dets) == 2 and all(d.shape[1] == 6 for d in dets)
    module.on_validation_epoch_end()
    summary = module.last_eval["val"]["summary"]
    assert {"voc07_map50", "voc_map50", "coco_map", "coco_map50"} <= set(summary)
    assert "val/voc07_map50" in logged and "val/mAP" in logged


def test_from_checkpoint_reads_weights_only(tmp_path):
    module = tiny_module(
        backbone={"name": "mobilenet_v3_large", "pretrained": False, "width_mult": 0.25},
        anchors={
            "name": "ssd",
            "scales": [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0],
            "aspect_ratios": [1.0, 2.0, 0.5],
        },
        head={"name": "ssdlite"},
        image_size=[64, 64],
    )
    path = tmp_path / "m.ckpt"
    atomic_torch_save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path
    )
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["hyper_parameters"]["class_names"] == CLASSES
    # A checkpoint of a pretrained backbone never downloads again: pretrained is turned off.
    ckpt["hyper_parameters"]["backbone"]["pretrained"] = True
    atomic_torch_save(ckpt, path)
    again = DetectionModule.from_checkpoint(path, postprocess={"name": "global", "top_k": 10})
    assert again.hparams["backbone"]["pretrained"] is False
    assert again.detector.postprocess.top_k == 10
    for (k, a), b in zip(module.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# -- metrics plumbing --------------------------------------------------------------------


def test_batch_to_metric_inputs_maps_back_to_original_pixels():
    batch = tiny_batch()
    det = [torch.tensor([[1.0, 0.9, 0.1, 0.1, 0.5, 0.6]]), torch.zeros(0, 6)]
    preds, targets = batch_to_metric_inputs(det, batch)
    # orig (H, W) = (128, 256): x * 256, y * 128
    assert torch.allclose(preds[0]["boxes"], torch.tensor([[25.6, 12.8, 128.0, 76.8]]))
    assert preds[0]["labels"].tolist() == [1] and preds[1]["boxes"].shape == (0, 4)
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[51.2, 38.4, 102.4, 115.2]]))
    assert targets[1]["labels"].tolist() == [2] and targets[1]["difficult"].tolist() == [False]


def test_evaluator_perfect_and_difficult_ignored():
    ev = DetectionEvaluator(CLASSES)
    gt = {
        "boxes": torch.tensor([[10.0, 10, 50, 60], [60, 60, 90, 80], [5, 5, 9, 9]]),
        "labels": torch.tensor([1, 2, 2]),
        "difficult": torch.tensor([False, False, True]),
    }
    pred = {
        "boxes": torch.tensor([[10.0, 10, 50, 60], [60, 60, 90, 80]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
    }
    ev.update([pred], [gt])
    out = ev.compute()
    s = out["summary"]
    assert s["voc07_map50"] == pytest.approx(1.0) and s["voc_map50"] == pytest.approx(1.0)
    assert s["coco_map"] == pytest.approx(1.0)
    assert out["per_class"]["circle"]["voc_ap50"] == pytest.approx(1.0)
    assert math.isnan(out["per_class"]["triangle"]["voc_ap50"])  # no ground truth
    table = format_ap_table(out["per_class"], s)
    assert "circle" in table and "mean" in table and "1.0000" in table
    ev.reset()
    ev.update([pred], [{**gt, "difficult": torch.tensor([False, True, False])}])
    # The square detection hits a difficult box (ignored) and the small square is missed.
    assert ev.compute()["per_class"]["square"]["voc_ap50"] == pytest.approx(0.0)


def test_voc_metrics_use_continuous_iou():
    # Continuous IoU 100 / 210 = 0.476 (below the threshold: a miss); with the devkit's +1
    # it would be 121 / 242 = 0.5 (a hit). Our boxes are continuous, so it must miss.
    ev = DetectionEvaluator(["a"], coco=False)
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    pred = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 21.0]]),
        "scores": torch.tensor([1.0]),
        "labels": torch.tensor([1]),
    }
    ev.update([pred], [gt])
    assert ev.compute()["summary"]["voc_map50"] == pytest.approx(0.0)
    assert ev.voc.pixel_inclusive is False and ev.voc07.use_07_metric is True


# -- callbacks and checkpoints -----------------------------------------------------------


def _fake_trainer(last: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda v, all=True: v),
        current_epoch=3,
        global_step=42,
        checkpoint_callbacks=[SimpleNamespace(last_model_path=last, best_model_path="")],
    )


def test_stop_on_nonfinite_loss_names_the_step_and_the_checkpoint():
    cb = StopOnNonFiniteLoss()
    module = SimpleNamespace(
        last_losses={"loss": torch.tensor(float("nan")), "loss_box": torch.tensor(0.5)}
    )
    cb.on_before_backward(_fake_trainer(), module, torch.tensor(1.0))  # finite: nothing
    with pytest.raises(
        NonFiniteLossError, match=r"epoch 3, global step 42 .*loss=nan.*ckpt/last.ckpt"
    ):
        cb.on_before_backward(_fake_trainer("ckpt/last.ckpt"), module, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="No checkpoint"):
        cb.on_before_backward(_fake_trainer(), SimpleNamespace(), torch.tensor(float("inf")))


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io.load_checkpoint(path)["step"].item() == 1

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert load_checkpoint(path)["step"].item() == 3


def test_checkpoint_io_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": SimpleNamespace(a=1)}, path)
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_channels_last_keeps_the_outputs_and_survives_the_checkpoint(tmp_path):
    plain_module = tiny_module().eval()
    nhwc = tiny_module(channels_last=True).eval()  # same seed: the same weights
    conv = nhwc.detector.backbone.modules()
    weights = [m.weight for m in conv if isinstance(m, nn.Conv2d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    images = tiny_batch()["images"]
    with torch.no_grad():
        a, b = plain_module.detector.raw(images), nhwc.detector.raw(images)
    for key in ("cls_logits", "box_deltas"):
        assert torch.allclose(a[key], b[key], atol=1e-4)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": nhwc.state_dict(), "hyper_parameters": dict(nhwc.hparams)}, path)
    again = DetectionModule.from_checkpoint(path)
    assert again.hparams["channels_last"] is True
    first = next(m for m in again.detector.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.is_contiguous(memory_format=torch.channels_last)
