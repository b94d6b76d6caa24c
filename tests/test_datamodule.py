"""Dataset, collate and DataModule: the batch contract, padding, mapping back, workers,
seeds, the image cache and the predict split, on a tiny on-disk dataset."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ssdlit.datamodules.collate import collate_detection, pad_targets, to_original_pixels
from ssdlit.datamodules.datamodule import (
    DetectionDataModule,
    DetectionDataset,
    predict_records,
)
from ssdlit.datamodules.records import Record
from ssdlit.datamodules.transforms import build_transforms

CLASSES = ["cat", "dog", "bird"]
SIZE = (64, 80)  # network input (H, W)


def pil_loader(path: Path) -> np.ndarray:
    """A local Pillow loader (tests do not depend on the annotation sources' loader)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class CountingLoader:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> np.ndarray:
        self.calls += 1
        return pil_loader(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[Record]:
    """Five small images (PNG and JPEG, different sizes) with 0, 1, 3, 1 and 2 boxes."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    specs = [  # (name, H, W, boxes)
        ("a.png", 60, 90, []),
        ("b.jpg", 72, 96, [[10, 8, 50, 40]]),
        ("c.png", 96, 64, [[2, 3, 30, 40], [30, 40, 60, 90], [5, 50, 25, 70]]),
        ("d.jpg", 64, 64, [[16, 16, 48, 48]]),
        ("e.png", 80, 120, [[0, 0, 60, 40], [70, 30, 118, 78]]),
    ]
    records = []
    for i, (name, h, w, boxes) in enumerate(specs):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / name)
        n = len(boxes)
        records.append(
            Record(
                path=root / name,
                width=w,
                height=h,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=(np.arange(n) % 3 + 1).astype(np.int64),
                difficult=np.arange(n) == 1,
                image_id=f"img{i}",
            )
        )
    return records


def source(records):
    return SimpleNamespace(records=records, class_names=CLASSES)


def check_batch(batch: dict, batch_size: int, counts: list[int] | None = None) -> None:
    images, boxes, labels, mask, diff = (
        batch[k] for k in ("images", "boxes", "labels", "mask", "difficult")
    )
    assert images.dtype == torch.uint8 and images.shape == (batch_size, 3, *SIZE)
    g = boxes.shape[1]
    assert g >= 1
    assert boxes.dtype == torch.float32 and boxes.shape == (batch_size, g, 4)
    assert labels.dtype == torch.int64 and labels.shape == (batch_size, g)
    assert mask.dtype == torch.bool and mask.shape == (batch_size, g)
    assert diff.dtype == torch.bool and diff.shape == (batch_size, g)
    assert (labels[~mask] == 0).all() and (boxes[~mask] == 0).all() and not diff[~mask].any()
    assert ((labels[mask] >= 1) & (labels[mask] <= len(CLASSES))).all()
    real = boxes[mask]
    assert (real >= 0).all() and (real <= 1).all()
    assert (real[:, 2] > real[:, 0]).all() and (real[:, 3] > real[:, 1]).all()
    assert isinstance(batch["meta"], list) and len(batch["meta"]) == batch_size
    for m in batch["meta"]:
        assert {"image_id", "path", "orig_size", "input_size", "scale", "offset"} <= set(m)
        assert m["input_size"] == SIZE
    if counts is not None:
        assert mask.sum(1).tolist() == counts
        assert g == max(1, *counts)


# -- collate ------------------------------------------------------------------------------


def fake_sample(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.5
    return {
        "image": torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8, generator=g),
        "boxes": torch.cat([xy, xy + 0.3], dim=1),
        "labels": torch.randint(1, 4, (n,), generator=g),
        "difficult": torch.rand(n, generator=g) > 0.5,
        "meta": {"image_id": str(seed)},
    }


def test_collate_shapes_and_padding():
    samples = [fake_sample(n, i) for i, n in enumerate([0, 1, 3])]
    batch = collate_detection(samples)
    assert batch["images"].shape == (3, 3, *SIZE) and batch["images"].dtype == torch.uint8
    assert batch["boxes"].shape == (3, 3, 4)
    assert batch["mask"].tolist() == [[False] * 3, [True, False, False], [True] * 3]
    for i, s in enumerate(samples):
        n = s["boxes"].shape[0]
        torch.testing.assert_close(batch["boxes"][i, :n], s["boxes"])
        assert torch.equal(batch["labels"][i, :n], s["labels"])
        assert torch.equal(batch["difficult"][i, :n], s["difficult"])
        assert (batch["labels"][i, n:] == 0).all() and (batch["boxes"][i, n:] == 0).all()
    assert [m["image_id"] for m in batch["meta"]] == ["0", "1", "2"]
    empty = collate_detection([fake_sample(0, 0), fake_sample(0, 1)])
    assert empty["boxes"].shape == (2, 1, 4) and not empty["mask"].any()
    assert (empty["labels"] == 0).all()


def test_pad_targets_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    counts = [int(c) for c in torch.randint(0, 6, (9,), generator=g)]
    boxes = [torch.rand(n, 4, generator=g) for n in counts]
    labels = [torch.randint(1, 5, (n,), generator=g) for n in counts]
    diff = [torch.rand(n, generator=g) > 0.5 for n in counts]
    b, lab, mask, d = pad_targets(boxes, labels, diff)
    big = max(1, *counts)
    for i, n in enumerate(counts):
        want = torch.zeros(big, 4)
        want[:n] = boxes[i]
        assert torch.equal(b[i], want)
        assert torch.equal(lab[i, :n], labels[i]) and (lab[i, n:] == 0).all()
        assert torch.equal(d[i, :n], diff[i]) and not d[i, n:].any()
        assert mask[i].tolist() == [True] * n + [False] * (big - n)


# -- dataset and mapping back --------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"letterbox": True}, {"letterbox": True, "letterbox_center": False}],
    ids=["resize", "letterbox", "letterbox-topleft"],
)
def test_to_original_pixels_inverts_val_pipelines(tiny, options):
    ds = DetectionDataset(tiny, build_transforms("val", SIZE, **options), loader=pil_loader)
    for i, rec in enumerate(tiny):
        s = ds[i]
        assert s["image"].shape == (3, *SIZE) and s["image"].dtype == torch.uint8
        assert s["meta"]["orig_size"] == (rec.height, rec.width)
        back = to_original_pixels(s["boxes"], s["meta"])
        torch.testing.assert_close(back, torch.from_numpy(rec.boxes), atol=1e-2, rtol=0)
        back_np = to_original_pixels(s["boxes"].numpy(), s["meta"])
        np.testing.assert_allclose(back_np, rec.boxes, atol=1e-2)
        if options.get("letterbox") and rec.height * SIZE[1] != rec.width * SIZE[0]:
            assert s["meta"]["offset"] != (0.0, 0.0) or not options.get("letterbox_center", True)
            sx, sy = s["meta"]["scale"]
            assert abs(sx - sy) < 0.05  # aspect ratio kept


def test_dataset_sample_contract_under_ssd(tiny):
    ds = DetectionDataset(tiny, build_transforms("ssd", SIZE, seed=0), loader=pil_loader)
    for _ in range(4):
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].shape == (3, *SIZE) and s["image"].dtype == torch.uint8
            n = s["boxes"].shape[0]
            assert s["boxes"].dtype == torch.float32 and s["boxes"].shape == (n, 4)
            assert s["labels"].dtype == torch.int64 and s["labels"].shape == (n,)
            assert s["difficult"].dtype == torch.bool and s["difficult"].shape == (n,)
            assert (s["boxes"] >= 0).all() and (s["boxes"] <= 1).all()
            assert n <= tiny[i].num_boxes


def test_default_loader_is_the_records_own(tiny):
    ds = DetectionDataset(tiny, build_transforms("val", SIZE))
    a = ds.load_image(1)
    np.testing.assert_array_equal(a, tiny[1].load_image())
    assert ds[1]["image"].shape == (3, *SIZE)


# -- DataModule ---------------------------------------------------------------------------


def make_dm(tiny, **kw) -> DetectionDataModule:
    kw = {
        "train": source(tiny),
        "val": (tiny, CLASSES),
        "image_size": SIZE,
        "batch_size": 2,
        "loader": pil_loader,
        **kw,
    }
    return DetectionDataModule(**kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_batches(tiny, workers):
    dm = make_dm(tiny, num_workers=workers, persistent_workers=workers > 0)
    assert dm.num_classes == 3 and dm.class_names == CLASSES
    dm.setup("fit")
    train = dm.train_dataloader()
    if workers:
        assert train.persistent_workers
    for _epoch in range(2):
        sizes = []
        for batch in train:
            check_batch(batch, batch["images"].shape[0])
            sizes.append(batch["images"].shape[0])
        assert sizes == [2, 2, 1]
    val = list(dm.val_dataloader())
    assert [b["images"].shape[0] for b in val] == [2, 2, 1]
    check_batch(val[0], 2, counts=[0, 1])
    check_batch(val[1], 2, counts=[3, 1])
    assert [m["image_id"] for b in val for m in b["meta"]] == [r.image_id for r in tiny]


def _epochs(dm, n=2):
    loader = dm.train_dataloader()
    return [[b for b in loader] for _ in range(n)]


def _same(a, b) -> bool:
    return all(
        torch.equal(x["images"], y["images"])
        and torch.equal(x["boxes"], y["boxes"])
        and [m["image_id"] for m in x["meta"]] == [m["image_id"] for m in y["meta"]]
        for ea, eb in zip(a, b, strict=True)
        for x, y in zip(ea, eb, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_same_seed_same_batches(tiny, workers):
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    a = _epochs(make_dm(tiny, seed=5, **kw))
    b = _epochs(make_dm(tiny, seed=5, **kw))
    c = _epochs(make_dm(tiny, seed=6, **kw))
    assert _same(a, b)
    assert not _same(a, c)
    assert not _same([a[0]], [a[1]])  # epochs differ from each other


def test_workers_do_not_repeat_each_others_augmentation(tiny):
    """Two workers, each the same record list: their (reseeded) augmentations differ."""
    recs = [tiny[3]] * 4  # the same image four times
    dm = make_dm(recs, val=None, num_workers=2, batch_size=1, augment={"train": "ssd"})
    batches = [b["images"] for b in dm.train_dataloader()]
    # batches 0 and 1 come from different workers (round robin): first draws differ
    assert not torch.equal(batches[0], batches[1])


def test_cache_images_decodes_once(tiny):
    counting = CountingLoader()
    dm = make_dm(tiny, loader=counting, cache_images=True, augment={"val": {"name": "val"}})
    dm.setup("fit")
    assert counting.calls == 2 * len(tiny)  # train and val, once each
    assert dm.datasets["train"].cached_bytes > 0
    for _ in range(2):
        for _batch in dm.train_dataloader():
            pass
    for _batch in dm.val_dataloader():
        pass
    assert counting.calls == 2 * len(tiny)
    plain = make_dm(tiny)
    plain.setup("validate")
    cached_val = [b["images"] for b in dm.val_dataloader()]
    plain_val = [b["images"] for b in plain.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(cached_val, plain_val, strict=True))


def test_cache_images_with_workers(tiny):
    dm = make_dm(tiny, cache_images=["train"], num_workers=2, persistent_workers=True)
    dm.setup("fit")
    assert dm.datasets["train"].cached_bytes > 0 and dm.datasets["val"].cached_bytes == 0
    for batch in dm.train_dataloader():
        check_batch(batch, batch["images"].shape[0])


def test_augment_options_per_split(tiny):
    dm = make_dm(
        tiny,
        augment={
            "train": {"name": "light", "flip_p": 0.0},
            "val": {"name": "val", "letterbox": True},
        },
    )
    dm.setup("fit")
    meta = dm.datasets["val"][4]["meta"]  # 80 x 120 image into 64 x 80: letterboxed
    assert meta["offset"][1] > 0 and meta["offset"][0] == 0
    s = dm.datasets["train"][1]
    v = DetectionDataset(tiny, build_transforms("val", SIZE), loader=pil_loader)[1]
    torch.testing.assert_close(s["boxes"], v["boxes"])  # light without flip == resize
    with pytest.raises(ValueError, match="unknown split"):
        make_dm(tiny, augment={"training": "ssd"})


def test_predict_split_from_folder_glob_and_list(tiny):
    folder = tiny[0].path.parent
    for inputs in (folder, str(folder / "*.png"), [tiny[1].path, str(tiny[2].path)]):
        dm = DetectionDataModule(
            predict=inputs, image_size=SIZE, batch_size=2, class_names=CLASSES, loader=pil_loader
        )
        dm.setup("predict")
        batches = list(dm.predict_dataloader())
        metas = [m for b in batches for m in b["meta"]]
        expected = predict_records(inputs)
        assert [m["path"] for m in metas] == [str(r.path) for r in expected]
        for b in batches:
            assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, *SIZE)
            assert b["boxes"].shape[1] == 1 and not b["mask"].any()
    assert len(predict_records(folder)) == len(tiny)
    assert len(predict_records(str(folder / "*.png"))) == 3
    with pytest.raises(FileNotFoundError):
        predict_records(folder / "missing.jpg")


def test_class_names_sources(tiny):
    assert make_dm(tiny).class_names == CLASSES
    dm = DetectionDataModule(train=tiny, class_names=["x"])
    assert dm.num_classes == 1
    with pytest.raises(AttributeError):
        _ = DetectionDataModule(train=tiny).class_names
    with pytest.raises(TypeError):
        DetectionDataModule(train=[1, 2, 3])
    empty = DetectionDataModule(train=source(tiny))
    assert empty.val_dataloader() == [] and empty.test_dataloader() == []


def test_drop_last_with_fewer_images_than_a_batch_is_an_error(tiny):
    dm = make_dm(tiny, batch_size=len(tiny) + 1, drop_last=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match="fewer than one batch"):
        dm.train_dataloader()
    assert len(make_dm(tiny, batch_size=len(tiny) + 1).train_dataloader()) == 1


def test_read_only_decodes_give_a_writable_sample_without_warning(tiny):
    """A decode that no transform copies (already the input size) is read-only, e.g. the
    image cache's own array: the sample copies it instead of warning (or sharing it)."""
    frozen = np.zeros((*SIZE, 3), dtype=np.uint8)
    frozen.setflags(write=False)
    ds = DetectionDataset(tiny, build_transforms("val", SIZE), loader=lambda _path: frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = ds[0]["image"]
    image[0, 0, 0] = 255  # writing to the sample leaves the decoded array alone
    assert frozen[0, 0, 0] == 0


# ---------------------------------------------------------------------------------------
# Images that cannot be decoded when loaded: on_bad decides (skip: replaced, counted,
# logged once; error: one DataError naming the file, from the main process or a worker).


def _flat_with_broken_images(root: Path) -> Path:
    """Flat VOC: a0, a1, bad (header fine, data garbage), c0, cut (tail-truncated JPEG)."""
    from tests.data_builders import add_flat_item, corrupt_jpeg, truncated_jpeg

    box = [{"name": "cat", "box": (2, 2, 20, 16)}]
    for stem in ("a0", "a1", "c0"):
        add_flat_item(root, stem, box)
    add_flat_item(root, "bad", box, image=False)
    corrupt_jpeg(root / "images" / "bad.jpg")
    add_flat_item(root, "cut", box, image=False, width=64, height=64)
    truncated_jpeg(root / "images" / "cut.jpg", cut=20)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_image_skipped_when_loaded(tmp_path, num_workers, caplog):
    from ssdlit.datamodules import VOCSource

    root = _flat_with_broken_images(tmp_path)
    src = VOCSource(root=root, on_bad="skip")  # check_images="header": the header is fine
    assert [r.image_id for r in src.records] == ["a0", "a1", "bad", "c0", "cut"]
    dm = DetectionDataModule(
        train=src, val=src, image_size=SIZE, batch_size=2, num_workers=num_workers, seed=0
    )
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="ssdlit.datamodules.datamodule"):
        for _epoch in range(2):
            seen = [m["image_id"] for b in dm.train_dataloader() for m in b["meta"]]
            assert len(seen) == 5 and "bad" not in seen
    logged = [r.getMessage() for r in caplog.records if "bad.jpg" in r.getMessage()]
    val_ids = [m["image_id"] for b in dm.val_dataloader() for m in b["meta"]]
    assert val_ids == ["a0", "a1", "c0", "c0", "cut"]  # bad -> the next index, deterministic
    dm.teardown("fit")
    report = src.report
    assert report.counts("error") == {"unreadable_image": 1}, report.summary()
    assert report.skipped_images == 1
    assert report.counts("note") == {"truncated_image": 1}
    assert "bad.jpg" in report.errors[0].message() and "cut.jpg" in report.notes[0].message()
    dm.teardown("fit")  # counted once, however often the report is brought up to date
    assert report.skipped_images == 1 and len(report.problems) == 2
    if num_workers == 0:  # worker processes log on their own handlers
        assert len(logged) == 1, logged  # once, not once per epoch


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_image_under_error_stops_naming_the_file(tmp_path, num_workers):
    from ssdlit.datamodules import DataError, VOCSource

    src = VOCSource(root=_flat_with_broken_images(tmp_path), on_bad="error")
    dm = DetectionDataModule(train=src, image_size=SIZE, batch_size=5, num_workers=num_workers)
    with pytest.raises(DataError) as info:
        list(dm.train_dataloader())
    # Drop the traceback, which holds the loader's iterator: freed now (not by the cyclic
    # garbage collector, whose order leaves the worker waiting out torch's 5 s timeout).
    error = info.value.with_traceback(None)
    del info
    msg = str(error)
    assert "bad.jpg" in msg and "\n" not in msg, msg
    assert error.kind == "unreadable_image"


def test_undecodable_image_in_the_cache(tmp_path):
    from ssdlit.datamodules import DataError, VOCSource

    root = _flat_with_broken_images(tmp_path)
    dm = DetectionDataModule(train=VOCSource(root=root), image_size=SIZE, cache_images=True)
    with pytest.raises(DataError, match=r"bad\.jpg"):
        dm.setup("fit")
    src = VOCSource(root=root, on_bad="skip")
    dm = DetectionDataModule(train=src, image_size=SIZE, batch_size=5, cache_images=True)
    dm.setup("fit")  # decoding the cache does not stop at the broken image
    assert len(next(iter(dm.train_dataloader()))["meta"]) == 5
    dm.teardown("fit")
    assert src.report.skipped_images == 1


def test_undecodable_image_skipped_at_parse_through_the_config(tmp_path):
    from ssdlit.datamodules import build_datamodule

    root = _flat_with_broken_images(tmp_path)
    data = {
        "source": {"name": "voc", "root": str(root), "on_bad": "skip", "check_images": "decode"},
        "train": {},
        "val": None,
        "class_names": None,
        "batch_size": 2,
        "num_workers": 0,
    }
    dm = build_datamodule(data, {"train": {"name": "val"}}, SIZE)
    dm.setup("fit")
    seen = [m["image_id"] for b in dm.train_dataloader() for m in b["meta"]]
    assert sorted(seen) == ["a0", "a1", "c0", "cut"]  # the truncated JPEG is kept
    report = dm.reports["train"]
    assert report.counts("error") == {"unreadable_image": 1} and report.skipped_images == 1
    assert report.counts("note") == {"truncated_image": 1}


@pytest.mark.e2e  # a fresh Python process importing torch, and two loader workers
@pytest.mark.slow
def test_workers_start_after_multithreaded_opencv_in_the_parent(tmp_path):
    # A process that has run a multi-threaded OpenCV operation (albumentations, drawing the
    # synthetic data) and then forks loader workers: seed_worker's cv2.setNumThreads(1) on
    # the inherited, threadless pool blocked forever. Own process: OpenCV state is global.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import cv2, numpy as np
        from PIL import Image
        from ssdlit.datamodules import DetectionDataModule
        from ssdlit.datamodules.records import Record
        cv2.setNumThreads(2)
        big = np.zeros((2000, 2000, 3), np.uint8)
        for _ in range(3):
            cv2.resize(big, (1500, 1500))  # starts OpenCV's thread pool here
        records = []
        for i in range(4):
            path = "{tmp_path}/im%d.png" % i
            Image.new("RGB", (40, 30), (i * 50, 80, 120)).save(path)
            records.append(Record(path=path, width=40, height=30,
                                  boxes=np.array([[2, 2, 20, 20]], np.float32),
                                  labels=np.array([1]), image_id=str(i)))
        dm = DetectionDataModule(train=(records, ["thing"]), image_size=(32, 32),
                                 batch_size=2, num_workers=2, augment={{"train": "light"}})
        dm.setup("fit")
        print("batches", sum(1 for _ in dm.train_dataloader()))
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the loader's workers hung at start (OpenCV pool inherited across fork)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batches 2" in done.stdout
