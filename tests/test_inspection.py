import numpy as np

from ssdlit.anchors import SSDAnchorGenerator
from ssdlit.datamodules.records import Record
from ssdlit.inspection import coverage_report, dataset_statistics, draw_records, text_histogram


def make_records(tmp_path, boxes_per_image):
    from PIL import Image

    records = []
    for i, boxes in enumerate(boxes_per_image):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (100, 50), (40, 40, 40)).save(path)
        labels = [1 + (j % 2) for j in range(len(boxes))]
        records.append(
            Record(path, 100, 50, np.array(boxes, np.float32).reshape(-1, 4), labels, f"img{i}")
        )
    return records


def test_statistics_count_classes_sizes_and_aspects(tmp_path):
    records = make_records(tmp_path, [[[0, 0, 50, 25], [10, 10, 20, 40]], [], [[0, 0, 100, 50]]])
    stats = dataset_statistics(records, ["cat", "dog"])
    assert stats.boxes_per_class == {"cat": 2, "dog": 1}
    assert stats.images_per_class == {"cat": 2, "dog": 1}
    assert stats.num_empty_images == 1
    np.testing.assert_allclose(stats.aspect_ratios, [2.0, 1 / 3, 2.0])
    np.testing.assert_allclose(stats.relative_sizes, [0.5, np.sqrt(300 / 5000), 1.0], rtol=1e-6)
    text = stats.summary()
    assert "cat" in text and "100x50 (3)" in text


def test_text_histogram_counts():
    text = text_histogram(np.array([0.1, 0.2, 0.25, 5.0]), [0, 0.15, 0.3, np.inf])
    counts = [
        int(line.split()[-2]) if "#" in line else int(line.split()[-1])
        for line in text.splitlines()
    ]
    assert counts == [1, 2, 1]


def test_coverage_suggests_kmeans_anchors_when_poor(tmp_path):
    # Very thin boxes: SSD's default ratios cannot reach them.
    rng = np.random.default_rng(0)
    boxes = [[[x, 5, x + 3, 45]] for x in rng.uniform(0, 90, 12)]
    records = make_records(tmp_path, boxes)
    anchors = SSDAnchorGenerator.ssd300()([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
    cov, text = coverage_report(records, anchors, (300, 300), k=3)
    assert cov.recall < 0.5
    assert "k-means" in text and "aspect ratio" in text
    good = make_records(tmp_path, [[[10, 5, 60, 45]]] * 4)
    cov_good, text_good = coverage_report(good, anchors, (300, 300))
    assert cov_good.recall == 1.0 and "k-means" not in text_good


def test_draw_records_writes_pictures(tmp_path):
    records = make_records(tmp_path, [[[10, 10, 60, 40]], [[0, 0, 20, 20]], []])
    paths = draw_records(records, ["cat", "dog"], tmp_path / "drawn", 2)
    assert [p.name for p in paths] == ["img0.png", "img1.png"]
    from PIL import Image

    pixels = np.asarray(Image.open(paths[0]))
    assert (pixels[10, 30] != 40).any()  # the box outline was drawn over the grey background


def test_inspect_decodes_every_image_by_default(tmp_path):
    # A JPEG whose header reads but whose data does not: only decoding finds it, and the
    # training run would hit it, so inspect reports it without being asked.
    from hydra import compose, initialize_config_module

    from ssdlit.apps.inspect import inspect_data
    from tests.data_builders import add_flat_item, corrupt_jpeg, flat_dataset

    root = flat_dataset(tmp_path / "data")
    add_flat_item(root, "broken", [{"name": "cat", "box": (1, 1, 5, 5)}], image=False)
    corrupt_jpeg(root / "images" / "broken.jpg")
    overrides = [
        "data=voc_folder",
        f"data.root={root}",
        "data.source.on_bad=skip",
        f"+paths.output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        cfg = compose("inspect", overrides=overrides)
    assert cfg.data.source.check_images == "decode"
    results = inspect_data(cfg)
    train = results["splits"]["train"]
    assert train["problems"] == {"unreadable_image": 1} and train["images"] == 2
    listed = (tmp_path / "run" / "bad_records_train.jsonl").read_text()
    assert "broken.jpg" in listed
