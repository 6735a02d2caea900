"""ONNX export: validated against PyTorch, written atomically, done once per model."""

from __future__ import annotations

import json

import onnx
import pytest

from dts_util.engines import export
from dts_util.engines.components import get_component
from dts_util.errors import EngineBuildError


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_export_is_valid_onnx_with_dynamic_axes_and_small_error(cpu_model, tmp_path, component) -> None:
    path, record = export.export_component(cpu_model, get_component(component), tmp_path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == export.OPSET
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims][0] == "batch" and dims[2].dim_param == "height"
    assert [i.name for i in proto.graph.input] == get_component(component).input_names(cpu_model.info)
    assert 0 < record.rel_l2 < export.EXPORT_TOLERANCE
    assert json.loads((path.parent / export.RECORD_FILE).read_text())["rel_l2"] == record.rel_l2
    assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".partial")]


def test_export_is_reused(cpu_model, tmp_path) -> None:
    path, _ = export.export_component(cpu_model, get_component("vae_decoder"), tmp_path)
    stamp = path.stat().st_mtime_ns
    again, _ = export.export_component(cpu_model, get_component("vae_decoder"), tmp_path)
    assert again == path and again.stat().st_mtime_ns == stamp


def test_export_above_tolerance_fails_and_leaves_nothing(cpu_model, tmp_path) -> None:
    with pytest.raises(EngineBuildError, match=r"relative L2 error .* > tolerance"):
        export.export_component(cpu_model, get_component("vae_decoder"), tmp_path, tolerance=0.0)
    assert not list(tmp_path.rglob("*.onnx"))


def test_relative_l2() -> None:
    import torch

    a = torch.ones(10)
    assert export.relative_l2(a, a) == 0
    assert export.relative_l2(a * 1.1, a) == pytest.approx(0.1)
