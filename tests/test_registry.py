import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ssdlit.registry import (
    ANCHORS,
    BACKBONES,
    DATASETS,
    HEADS,
    MATCHERS,
    POSTPROCESS,
    ConfigError,
    Registry,
    RegistryError,
)


def test_register_by_decorator_and_call_then_build():
    reg = Registry("widget")

    @reg.register("square")
    def square(x: int = 2) -> int:
        return x * x

    @reg.register
    def cube(x: int = 2) -> int:
        return x**3

    reg.register("double", lambda x=2: 2 * x)
    assert reg.build("square", x=3) == 9
    assert reg.build("cube") == 8
    assert reg.build("double", x=5) == 10
    assert reg.names() == ["cube", "double", "square"]
    assert "square" in reg and len(reg) == 3


def test_duplicate_name_is_refused():
    reg = Registry("widget")
    reg.register("a", int)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", float)


def test_unknown_name_lists_known_and_closest():
    reg = Registry("head")
    for name in ("ssd", "ssdlite", "retina", "yolo"):
        reg.register(name, dict)
    with pytest.raises(RegistryError) as info:
        reg.build("retinna")
    msg = str(info.value)
    assert "unknown head 'retinna'" in msg
    assert "retina, ssd, ssdlite, yolo" in msg
    assert "Did you mean 'retina'?" in msg


def test_one_registry_per_component_kind():
    regs = [BACKBONES, ANCHORS, MATCHERS, HEADS, POSTPROCESS, DATASETS]
    assert len({id(r) for r in regs}) == 6
    assert {"ssd", "ssd_caffe", "retina", "yolo", "d2l"} <= set(ANCHORS.names())


PLUGIN = '''
import torch
from ssdlit.registry import HEADS


@HEADS.register("demo_head")
class DemoHead(torch.nn.Module):
    """A head from a third-party distribution."""

    def __init__(self, in_channels, num_anchors, num_classes):
        super().__init__()
        self.cls = torch.nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)

    def forward(self, x):
        return self.cls(x)
'''


def _write_distribution(root: Path, module: str, body: str, entry: str) -> None:
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ssdlit.plugins]\n{entry} = {module}\n")
    (info / "RECORD").write_text("")


def _run(code: str, path: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.e2e  # installs a plugin distribution and starts Python
def test_plugin_distribution_registers_a_head(tmp_path):
    _write_distribution(tmp_path, "ssdlit_demo_plugin", PLUGIN, "demo")
    proc = _run(
        """
        import json, torch
        from ssdlit.registry import HEADS, load_plugins
        assert "demo_head" not in HEADS
        first = load_plugins()
        again = load_plugins()  # idempotent
        head = HEADS.build("demo_head", in_channels=8, num_anchors=4, num_classes=3)
        out = head(torch.zeros(1, 8, 5, 5))
        print(json.dumps({"first": first, "again": again, "module": type(head).__module__, "shape": list(out.shape)}))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "demo" in result["first"] and result["again"] == []
    assert result["module"] == "ssdlit_demo_plugin"
    assert result["shape"] == [1, 12, 5, 5]


@pytest.mark.e2e  # starts Python with a broken plugin
def test_broken_plugin_names_itself(tmp_path):
    _write_distribution(
        tmp_path, "ssdlit_broken_plugin", "raise ImportError('missing dependency xyz')\n", "broken"
    )
    proc = _run("from ssdlit.registry import load_plugins; load_plugins()", tmp_path)
    assert proc.returncode != 0
    assert "ssdlit plugin 'broken'" in proc.stderr and "missing dependency xyz" in proc.stderr


def test_a_component_that_refuses_its_config_names_itself():
    reg = Registry("widget")

    @reg.register("box")
    def box(*, size: int = 1) -> int:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size

    with pytest.raises(ConfigError, match=r"widget 'box'.*unexpected keyword argument 'colour'"):
        reg.build("box", colour="red")
    with pytest.raises(ConfigError, match=r"widget 'box': size must be positive, got 0") as err:
        reg.build("box", size=0)
    assert isinstance(err.value, ValueError) and isinstance(err.value.__cause__, ValueError)

    class SpecialError(ValueError):
        pass

    @reg.register("special")
    def special() -> None:
        raise SpecialError("a subclass (a data source's DataError) passes unchanged")

    with pytest.raises(SpecialError):
        reg.build("special")


def test_a_key_for_another_component_says_how_to_drop_it():
    """`+experiment=ssd300_voc matcher=faster_rcnn` keeps the experiment's SSD matcher
    keys: the error names the key and the override that removes it."""
    import ssdlit.anchors  # noqa: F401  (registers the matchers)
    from ssdlit.detector import build_component
    from ssdlit.registry import MATCHERS

    with pytest.raises(ConfigError) as info:
        build_component(
            MATCHERS, {"name": "faster_rcnn", "matching": "multi", "neg_iou_limit": 0.5}
        )
    message = str(info.value)
    assert "matcher 'faster_rcnn'" in message
    assert "drop them with ~matcher.matching ~matcher.neg_iou_limit" in message
    assert isinstance(info.value.__cause__, TypeError)
