"""ONNX export of a model's UNet and VAE decoder, checked against PyTorch.

One export per (model weights, component), in fp32, shared by every backend,
resolution and batch: batch and spatial axes are dynamic, and engines fix them.
fp32 keeps the export runnable by ONNX Runtime's CPU provider for validation;
TensorRT builds fp16 engines from it with its fp16 flag.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dts_util.atomic_files import replace_folder
from dts_util.boundary import Shape
from dts_util.engines.paths import onnx_dir
from dts_util.engines.components import ComponentDescriptor
from dts_util.errors import EngineBuildError
from dts_util.models.loader import LoadedModel

log = logging.getLogger(__name__)

OPSET = 17  # the TorchScript exporter's UNet/VAE export is verified at 17
# From this many bytes of weights, export streams them to the data file instead: the exporter's own
# way holds a second copy of every weight (SD1.5's UNet, 3.4 GB, peaked at 7.2 GB of RSS), which
# an SDXL UNet (10.3 GB) cannot afford on a 24 GB machine.
STREAMED_EXPORT_MIN_BYTES = 4 * 1024**3
EXPORT_TOLERANCE = 1e-3  # relative L2 between ONNX Runtime and PyTorch, both fp32
MODEL_FILE, DATA_FILE, RECORD_FILE = "model.onnx", "model.onnx.data", "export.json"
EXPORT_FORMAT = 2


@dataclass(frozen=True)
class ExportRecord:
    """What export.json says about one ONNX export."""

    component: str
    model_fingerprint: str
    opset: int
    rel_l2: float
    tolerance: float
    seconds: float
    bytes: int
    torch_version: str
    # 2: the UNet's text length is a dynamic axis (long prompts); older exports are made again.
    format: int = 1


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double().flatten(), expected.double().flatten()
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected).clamp_min(1e-12))


def onnx_model_path(engine_dir: Path, model: LoadedModel, component: str) -> Path:
    return onnx_dir(engine_dir, model.name, model.fingerprint, component, "fp32") / MODEL_FILE


def read_export_record(folder: Path) -> ExportRecord | None:
    try:
        return ExportRecord(**json.loads((folder / RECORD_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def export_component(model: LoadedModel, component: ComponentDescriptor, engine_dir: Path,
                     tolerance: float = EXPORT_TOLERANCE, shape: Shape | None = None) -> tuple[Path, ExportRecord]:
    """Export (or reuse) ``component``'s ONNX for ``model``; returns the .onnx path and its record.

    ``model`` must be an fp32 model on the CPU (see ``load_model(..., device="cpu")``).
    The export is written to a temporary folder, validated, and renamed into place. One export
    serves every shape, except for components whose axes the exporter cannot keep symbolic
    (``static_export``): those are exported at ``shape``, the engine's.
    """
    static = component.static_export and shape is not None
    export_shape = shape if static else component.representative_shape(model.info)
    shape_tag = f"{export_shape.latent_width}x{export_shape.latent_height}-b{export_shape.batch}-t{export_shape.text_length}"
    name = f"{component.name}-{shape_tag}" if static else component.name
    final = onnx_dir(engine_dir, model.name, model.fingerprint, name, "fp32")
    record = read_export_record(final)
    if record is not None and record.model_fingerprint == model.fingerprint and record.format == EXPORT_FORMAT \
            and (final / MODEL_FILE).is_file():
        return final / MODEL_FILE, record
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{component.name}-", dir=final.parent))
    try:
        start = time.perf_counter()
        path, streamed = _export_to(model, component, tmp, export_shape, dynamic=not static)
        rel_l2 = validate_onnx(model, component, path, free_eager=streamed, shape=export_shape)
        if rel_l2 > tolerance:
            raise EngineBuildError(f"ONNX export of {component.name} differs from PyTorch: relative L2 error "
                                   f"{rel_l2:.2e} > tolerance {tolerance:.0e}; the export is not usable")
        size = sum(f.stat().st_size for f in tmp.iterdir())
        record = ExportRecord(component.name, model.fingerprint, OPSET, rel_l2, tolerance,
                              round(time.perf_counter() - start, 2), size, torch.__version__, EXPORT_FORMAT)
        (tmp / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        # An export of other weights or a failed record is replaced, with no moment in which there is none.
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s of %r to ONNX (rel L2 %.2e, %.1fs)", component.name, model.name, record.rel_l2, record.seconds)
    return final / MODEL_FILE, record


def _rms_norm(g, values, normalized_shape, weight, eps):
    """``aten::rms_norm`` (FLUX's query/key norms) as opset-17 ONNX: x / sqrt(mean(x^2) + eps) x weight. ONNX has
    RMSNormalization only from opset 23, which the TorchScript exporter does not write."""
    from torch.onnx import symbolic_helper as helper

    axes = list(range(-len(helper._get_const(normalized_shape, "is", "normalized_shape")), 0))
    epsilon = None if helper._is_none(eps) else helper._maybe_get_const(eps, "f")
    epsilon = float(torch.finfo(torch.float32).eps) if epsilon is None else float(epsilon)
    mean = g.op("ReduceMean", g.op("Mul", values, values), axes_i=axes, keepdims_i=1)
    scaled = g.op("Div", values, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon)))))
    return scaled if helper._is_none(weight) else g.op("Mul", scaled, weight)


def _register_symbolics() -> None:
    """Ops the TorchScript exporter lacks at OPSET (registered for ONNX export only; eager code is untouched)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)


def _export_to(model: LoadedModel, component: ComponentDescriptor, folder: Path, shape: Shape,
               dynamic: bool = True) -> tuple[Path, bool]:
    """torch.onnx.export (TorchScript exporter) at ``shape`` into ``folder``, weights over 2 GB as one external
    file, its axes symbolic when ``dynamic``. Returns the .onnx path and whether the weights were streamed."""
    import onnx

    _register_symbolics()
    info = model.info
    inputs = component.sample_inputs(info, shape)
    module = component.export_module(model)
    axes = component.dynamic_axes(info) if dynamic else {}
    if _weight_bytes(module) >= STREAMED_EXPORT_MIN_BYTES:
        return _export_streamed(module, component, axes, inputs, folder), True
    raw = folder / "raw"
    raw.mkdir()
    # The tracer warns about every Python-side shape check in diffusers; they are expected.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs.values()), str(raw / MODEL_FILE),
            input_names=list(inputs), output_names=component.output_names(), dynamic_axes=axes,
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    # Past protobuf's 2 GB limit the exporter scatters the weights over one file per tensor;
    # gather them into one data file. Below it, the single .onnx file is kept as it is.
    if len(list(raw.iterdir())) == 1:
        (raw / MODEL_FILE).rename(folder / MODEL_FILE)
    else:
        proto = onnx.load(str(raw / MODEL_FILE), load_external_data=True)
        onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE)
    shutil.rmtree(raw)
    return folder / MODEL_FILE, False


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _named_tensors(module).values())


def _export_streamed(module: torch.nn.Module, component: ComponentDescriptor, axes: dict, inputs: dict,
                     folder: Path) -> Path:
    """Export the graph without weights, then write each weight to the one data file in turn.

    Weights become graph inputs named after the module's parameters; each is turned back into
    an initializer whose bytes live in the data file. Nothing but the model and one tensor is
    in memory at a time. Constant folding is off (weights are not constants yet); the backends
    fold what is left when they build.
    """
    import onnx
    from onnx import helper

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs.values()), str(folder / MODEL_FILE), input_names=list(inputs),
            output_names=component.output_names(), dynamic_axes=axes, opset_version=OPSET,
            do_constant_folding=False, export_params=False, keep_initializers_as_inputs=True, dynamo=False,
        )
    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    tensors, kept_inputs = _named_tensors(module), []
    with (folder / DATA_FILE).open("wb") as data:
        for graph_input in proto.graph.input:
            tensor = tensors.get(graph_input.name)
            if tensor is None:
                kept_inputs.append(graph_input)
                continue
            array = tensor.detach().cpu().contiguous().numpy()
            initializer = onnx.TensorProto(name=graph_input.name, dims=array.shape,
                                           data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                           data_location=onnx.TensorProto.EXTERNAL)
            offset = data.tell()
            data.write(memoryview(array).cast("B"))
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = initializer.external_data.add()
                entry.key, entry.value = key, value
            proto.graph.initializer.append(initializer)
    del proto.graph.input[:]
    proto.graph.input.extend(kept_inputs)
    onnx.save_model(proto, str(folder / MODEL_FILE))
    return folder / MODEL_FILE


def validate_onnx(model: LoadedModel, component: ComponentDescriptor, path: Path, seed: int = 1,
                  free_eager: bool = False, shape: Shape | None = None) -> float:
    """Relative L2 between ONNX Runtime (through polygraphy's runner) and PyTorch on seeded inputs.

    ``free_eager``: drop the eager component once its output is known, so ONNX Runtime's copy of the
    weights is never resident beside it (it loads again when next needed).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-session info lines would interleave with our progress
    info = model.info
    inputs = component.sample_inputs(info, shape or component.representative_shape(info), seed=seed)
    with torch.inference_mode():
        expected = component.export_module(model)(**inputs)
    if free_eager:
        model.unload(component.weights)
        import gc

        gc.collect()
    with OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])) as runner:
        outputs = runner.infer({name: value.numpy() for name, value in inputs.items()})
    actual = torch.from_numpy(outputs[component.output_name])
    return relative_l2(actual, expected)

