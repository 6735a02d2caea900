"""Big-model export: weights streamed into the data file one tensor at a time, and engines built from it."""

from __future__ import annotations

import pytest

from dts_util.engines import export
from dts_util.engines.builder import build, plan


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_streamed_export_builds_engines_that_match_pytorch(cpu_model, tmp_path, monkeypatch, backend) -> None:
    from dts_util.engines.backends import openvino_available

    if backend == "openvino" and not openvino_available()[0]:
        pytest.skip("openvino is not installed")
    monkeypatch.setattr(export, "STREAMED_EXPORT_MIN_BYTES", 1)  # stream even the built-in model
    for job in plan(cpu_model, tmp_path, [(64, 64)], [1], backend_name=backend, precision="fp32"):
        result = build(job, cpu_model, tmp_path)
        assert result.status == "built" and result.rel_l2 < 1e-3, result.error
    exports = list(tmp_path.rglob(export.DATA_FILE))
    assert len(exports) == 3 and all(path.stat().st_size > 0 for path in exports)
