"""ONNX export, simplification, parity verification and safe loading.

This module owns the step "torch model → .onnx file that provably computes the same function":

* :func:`export_onnx` exports in eval mode with a dynamic batch axis, simplifies with onnxsim,
  checks the graph with ``onnx.checker`` and verifies parity against torch with ONNX Runtime at
  two batch sizes, writing the file atomically (nothing appears at ``path`` unless every step
  passed).
* :func:`verify_onnx` is that parity check on its own.
* :func:`load_onnx` loads a file that may come from anywhere and turns every way it can be bad
  into a one-line :class:`~structadmm.errors.StructADMMError`.
* :func:`onnx_signature` reads a file's inputs and outputs (names, dtypes, fixed and dynamic
  axes); ``export_onnx(..., signature=...)`` writes a file with exactly that signature, so it can
  replace the file it was read from.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from structadmm.errors import ParityError, StructADMMError, StructADMMWarning, one_line
from structadmm.files import atomic_path
from structadmm.layers import captured_output, eval_mode, flat_outputs, quiet_torch

log = logging.getLogger(__name__)

__all__ = ["ExportResult", "OnnxSignature", "TensorSpec", "export_onnx", "load_onnx", "onnx_signature", "verify_onnx"]

Inputs = torch.Tensor | Sequence[torch.Tensor]

_BATCH = "batch"
# A second batch size proves the exported batch axis is really dynamic (not baked in by tracing).
_OTHER_BATCH = 3
_OTHER_BATCH_SEED = 0


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, ONNX element type and axes.

    An axis is an int (fixed size) or a str (dynamic, with that name; an unnamed dynamic axis
    of the source file is named ``<tensor>_dim<i>``).
    """

    name: str
    elem_type: int
    dims: tuple[int | str, ...]

    @property
    def dtype(self) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(self.elem_type).name


@dataclass(frozen=True)
class OnnxSignature:
    """A model's inputs and outputs, in graph order (initializers are not inputs)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def fixed(self, input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]]) -> "OnnxSignature":
        """This signature with every dynamic axis but the batch (axis 0) fixed at the size it has in
        ``input_shapes`` and ``output_shapes`` (full shapes, batch first, one per input and output):
        what a model converted at one input size, whose graph freezes sizes computed from it, is
        written with."""
        def fix(specs: tuple[TensorSpec, ...], shapes: Sequence[Sequence[int]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.elem_type, tuple(
                d if i == 0 or isinstance(d, int) or len(shape) != len(t.dims) else int(shape[i])
                for i, d in enumerate(t.dims))) for t, shape in zip(specs, shapes))

        return OnnxSignature(fix(self.inputs, input_shapes), fix(self.outputs, output_shapes))

    def differences(self, other: "OnnxSignature") -> list[str]:
        """What ``other`` changes about this signature, one phrase each (empty when the same)."""
        found = []
        for kind, mine, theirs in (("inputs", self.inputs, other.inputs), ("outputs", self.outputs, other.outputs)):
            if [t.name for t in mine] != [t.name for t in theirs]:
                found.append(f"{kind} {[t.name for t in mine]} became {[t.name for t in theirs]}")
                continue
            for a, b in zip(mine, theirs):
                if a.elem_type != b.elem_type:
                    found.append(f"{a.name} would be {b.dtype}, not {a.dtype}")
                if len(a.dims) != len(b.dims) or any(
                        isinstance(x, str) != isinstance(y, str) or (isinstance(x, int) and x != y)
                        for x, y in zip(a.dims, b.dims)):
                    found.append(f"{a.name} would have axes {list(b.dims)}, not {list(a.dims)}")
        return found


def onnx_signature(model: onnx.ModelProto) -> OnnxSignature:
    """The inputs and outputs of ``model`` (see :class:`OnnxSignature`). An axis written with the size
    -1 or 0 (Paddle2ONNX's way of leaving it unknown) is dynamic, named like one that has no name."""
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or f"{value.name}_dim{i}")
            for i, d in enumerate(tensor.shape.dim)
        )
        return TensorSpec(value.name, tensor.elem_type, dims)

    return OnnxSignature(
        tuple(spec(v) for v in model.graph.input if v.name not in initializers),
        tuple(spec(v) for v in model.graph.output),
    )


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    ``max_abs_diff`` is the largest |torch − ONNX Runtime| over both verification batches (None
    when ``verify=False``). ``simplified`` is False when onnxsim failed or its output did not pass
    ``onnx.checker``; ``simplify_error`` then says why and the unsimplified graph was kept.
    """

    path: Path
    max_abs_diff: float | None
    simplified: bool
    opset: int
    simplify_error: str | None = None


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    *,
    simplify: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
    signature: OnnxSignature | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` with a dynamic batch axis (dim 0 of every input and output).

    Inputs are named ``input``, ``input_1``, …; outputs ``output``, ``output_1``, …. With
    ``signature`` (see :func:`onnx_signature`), the file gets its input and output names and
    dynamic axes instead, and :class:`StructADMMError` is raised unless the written file has
    exactly that signature (names, dtypes, axes): a drop-in replacement for its source. Raises
    :class:`ParityError` when ONNX Runtime disagrees with torch beyond ``atol + rtol·|torch|`` and
    :class:`StructADMMError` when the model cannot be exported; in both cases ``path`` is left
    untouched.
    """
    inputs = _as_tuple(example_inputs)
    path = Path(path)
    tmp = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, eval_mode(model):
            n_outputs = len(flat_outputs(_run_torch(model, inputs)))
            input_names = _names("input", len(inputs))
            output_names = _names("output", n_outputs)
            dynamic_axes = None
            if signature is not None:
                _check_counts(signature, len(inputs), n_outputs)
                input_names = [t.name for t in signature.inputs]
                output_names = [t.name for t in signature.outputs]
                dynamic_axes = signature.dynamic_axes()
            fallback = _export_raw(model, _traceable_batch(inputs), tmp, input_names, output_names, opset,
                                   dynamic_axes)
            proto = load_onnx(tmp)
            proto, simplified, simplify_error = _maybe_simplify(proto, simplify)
            if signature is not None:
                _check_signature(signature, onnx_signature(proto))
            onnx.save(proto, tmp)
            max_abs_diff = _verify_two_batches(model, tmp, inputs, atol, rtol) if verify else None
    except StructADMMError as exc:
        # The checks ran on the temp file; the user knows the file by the name they asked for.
        raise type(exc)(str(exc).replace(str(tmp), str(path))) from exc
    except OSError as exc:
        raise StructADMMError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if fallback is not None:
        warnings.warn(StructADMMWarning(f"{path.name} was written by torch's dynamo exporter (the TorchScript "
                                        f"exporter failed: {fallback})"), stacklevel=2)
    return ExportResult(path, max_abs_diff, simplified, _default_opset(proto), simplify_error)


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: Inputs,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    *,
    model_bytes: bytes | None = None,
) -> float:
    """Run ``model`` (in eval mode) and the ONNX file on ``inputs``; return the max abs difference.

    With ``model_bytes`` (a serialized model, already read and checked), ONNX Runtime runs those
    bytes and ``path`` only names them in messages.

    Outputs match when ``|onnx − torch| <= atol + rtol·max|torch|`` for every element of each
    output (float32 rounding grows with the magnitude of the computation, not of each element:
    an output near zero among outputs of 1e6 carries errors of 1e6's order); otherwise
    :class:`ParityError` is raised with the max abs diff, the tolerance and the path.
    """
    inputs = _as_tuple(inputs)
    with eval_mode(model):
        expected = [t.detach().cpu().numpy() for t in flat_outputs(_run_torch(model, inputs))]
    actual = _run_onnx(Path(path), inputs, model_bytes)
    batch = inputs[0].shape[0]
    if len(actual) != len(expected):
        raise ParityError(
            f"{path}: ONNX model has {len(actual)} outputs, the torch model {len(expected)}"
        )
    worst = 0.0
    for index, (got, want) in enumerate(zip(actual, expected)):
        if got.shape != want.shape:
            raise ParityError(
                f"{path}: at batch {batch}, output {index} has shape {list(got.shape)} in ONNX "
                f"Runtime but {list(want.shape)} in torch (is the batch axis baked in?)"
            )
        diff = _max_abs_diff(got, want)
        worst = max(worst, diff)
        finite = want[np.isfinite(want)]
        limit = atol + rtol * (float(np.abs(finite).max()) if finite.size else 0.0)
        if not (np.isnan(got) == np.isnan(want)).all() or not diff <= limit:
            raise ParityError(
                f"{path}: at batch {batch}, ONNX output {index} differs from torch: max abs "
                f"diff {diff:.3g} exceeds tolerance {limit:.3g} (atol={atol:g} + rtol={rtol:g}*max|torch|)"
            )
    return worst


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX file that may be truncated, malformed or hostile.

    External data is only read from inside the file's own folder (onnx refuses paths that
    escape it), and the model must pass ``onnx.checker.check_model(full_check=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise StructADMMError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(path, load_external_data=False)
        if _uses_external_data(proto):
            onnx.load_external_data_for_model(proto, str(path.parent))
    except (DecodeError, ValueError, OSError, onnx.checker.ValidationError) as exc:
        raise StructADMMError(
            f"{path}: not a readable ONNX file (truncated or corrupt?): {one_line(exc)}"
        ) from exc
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise StructADMMError(f"{path}: invalid ONNX model: {one_line(exc)}") from exc
    return proto


# --- export -------------------------------------------------------------------------------


def _check_counts(signature: OnnxSignature, n_inputs: int, n_outputs: int) -> None:
    if (len(signature.inputs), len(signature.outputs)) != (n_inputs, n_outputs):
        raise StructADMMError(
            f"the model takes {n_inputs} inputs and gives {n_outputs} outputs, but the signature to keep has "
            f"{len(signature.inputs)} and {len(signature.outputs)}"
        )


class SignatureError(StructADMMError):
    """The exported file cannot keep the signature asked for (its axes, names or dtypes)."""


def with_sample_shapes(proto: onnx.ModelProto, sample_shapes: Sequence[Sequence[int]]) -> onnx.ModelProto | None:
    """A copy of ``proto`` whose inputs' dynamic axes other than the batch are fixed at
    ``sample_shapes`` (one sample's shape per graph input); None when no such axis is dynamic.
    Raises when a fixed axis disagrees with the shape given."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != len(sample_shapes):
        raise StructADMMError(f"the model takes {len(inputs)} inputs, {len(sample_shapes)} shapes were given")
    for value, shape in zip(inputs, sample_shapes):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape) + 1:
            raise StructADMMError(f"input {value.name!r} has {len(dims)} axes, the sample shape {list(shape)} "
                                  f"{len(shape)} besides the batch")
        if any(d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != size for d, size in zip(dims[1:], shape)):
            raise StructADMMError(f"input {value.name!r} has axes {[_dim(d) for d in dims]}; a sample of "
                                  f"shape {list(shape)} does not fit them")
    if all(d.HasField("dim_value") and d.dim_value > 0 for i in inputs for d in i.type.tensor_type.shape.dim[1:]):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value, shape in zip((i for i in copy.graph.input if i.name not in initializers), sample_shapes):
        for dim, size in zip(value.type.tensor_type.shape.dim[1:], shape):
            dim.Clear()
            dim.dim_value = int(size)
    return copy


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str:
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?"


def _check_signature(wanted: OnnxSignature, got: OnnxSignature) -> None:
    changed = wanted.differences(got)
    if changed:
        raise SignatureError(
            f"the exported file would not be a drop-in replacement: {'; '.join(changed[:3])}"
        )



def _export_raw(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> str | None:
    """Export with the TorchScript exporter, falling back to the dynamo exporter; returns None when
    the TorchScript exporter wrote the file, else why it could not (one line).

    What the TorchScript exporter prints (IR dumps when it fails) is captured and logged at debug
    level (``--debug``), never printed.

    The TorchScript exporter is ~40x faster here and emits plain Conv/Gemm graphs with BN folded.
    ``dynamic_axes`` defaults to a dynamic batch axis on every input and output.
    """
    with captured_output() as noise:  # a failing TorchScript export prints its IR from native code
        try:
            _export_torchscript(model, inputs, path, input_names, output_names, opset, dynamic_axes)
            legacy_error = None
        except Exception as legacy_exc:  # noqa: BLE001 - any failure means "try the other exporter"
            legacy_error = legacy_exc
    if noise.text.strip():
        log.debug("the TorchScript exporter printed:\n%s", noise.text)
    if legacy_error is None:
        return None
    try:
        _export_dynamo(model, inputs, path, input_names, output_names, opset)
    except Exception as exc:  # noqa: BLE001 - the user needs one line, not an exporter traceback
        raise StructADMMError(
            f"cannot export {type(model).__name__} to ONNX: {one_line(exc)} "
            f"(TorchScript exporter: {one_line(legacy_error)})"
        ) from exc
    return one_line(legacy_error)


def _export_torchscript(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    if dynamic_axes is None:
        dynamic_axes = {name: {0: _BATCH} for name in input_names + output_names}
    with warnings.catch_warnings():
        # The exporter is deprecated but still the better one for these models (see _export_raw).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
) -> None:
    batch = torch.export.Dim(_BATCH)
    dynamic_shapes = tuple({0: batch} for _ in inputs)
    with quiet_torch():
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=True,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
        )


def _maybe_simplify(
    proto: onnx.ModelProto, simplify: bool
) -> tuple[onnx.ModelProto, bool, str | None]:
    """Return (model to keep, whether it is simplified, why simplification was dropped)."""
    if not simplify:
        return proto, False, None
    import onnxsim  # heavy import, only needed here

    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as exc:  # noqa: BLE001 - onnxsim failing is recoverable: keep the original
        return proto, False, f"onnxsim failed: {one_line(exc)}"
    if not ok:
        return proto, False, "onnxsim could not validate its result"
    try:
        onnx.checker.check_model(simplified, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return proto, False, f"onnxsim result fails onnx.checker: {one_line(exc)}"
    if not _batch_is_dynamic(simplified):
        return proto, False, "onnxsim made the batch axis static"
    return simplified, True, None


def _batch_is_dynamic(proto: onnx.ModelProto) -> bool:
    initializers = {init.name for init in proto.graph.initializer}
    values = [v for v in proto.graph.input if v.name not in initializers] + list(proto.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return False
    return True


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


# --- verification -------------------------------------------------------------------------


def _verify_two_batches(
    model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...], atol: float, rtol: float
) -> float:
    first = verify_onnx(model, path, inputs, atol, rtol)
    second = verify_onnx(model, path, _other_batch(inputs), atol, rtol)
    return max(first, second)


def _traceable_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs the exporter traces: a batch of one is repeated to two, since a size of 1 is
    traced as a constant (torch.export specialises it; model code that branches or builds masks
    on it bakes it in), which would leave the file's batch axis fixed."""
    if inputs and all(t.dim() > 0 and t.shape[0] == 1 for t in inputs):
        return tuple(torch.cat([t, t]) for t in inputs)
    return inputs


def _other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A seeded batch of a different size: random normals for float inputs, rows of the example
    (chosen at random) for integer inputs such as token ids, whose valid range we cannot guess."""
    size = _OTHER_BATCH if inputs[0].shape[0] != _OTHER_BATCH else _OTHER_BATCH + 2
    generator = torch.Generator().manual_seed(_OTHER_BATCH_SEED)
    batch: list[torch.Tensor] = []
    for tensor in inputs:
        if tensor.is_floating_point():
            sample = torch.randn((size, *tensor.shape[1:]), generator=generator, dtype=tensor.dtype)
        else:
            rows = torch.randint(0, tensor.shape[0], (size,), generator=generator)
            sample = tensor.detach().cpu()[rows]
        batch.append(sample.to(tensor.device))
    return tuple(batch)


def _run_onnx(path: Path, inputs: tuple[torch.Tensor, ...], model_bytes: bytes | None = None) -> list[np.ndarray]:
    import onnxruntime as ort  # heavy import, only needed here

    try:
        session = ort.InferenceSession(str(path) if model_bytes is None else model_bytes,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for bad files
        raise StructADMMError(f"{path}: ONNX Runtime cannot load it: {one_line(exc)}") from exc
    arrays = [t.detach().cpu().numpy() for t in inputs]
    feed = _feed(path, [i.name for i in session.get_inputs()], arrays)
    try:
        return session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT's runtime errors are one type per cause, none of ours
        shapes = ", ".join(str(list(a.shape)) for a in arrays)
        hint = ("; an axis the exporter fixed (the batch axis traced as a constant by the model's code, a "
                "recurrent layer's state size) does not accept this size" if "dimension" in str(exc).lower() else "")
        raise StructADMMError(f"{path}: ONNX Runtime cannot run it on inputs of shape {shapes}: "
                              f"{one_line(exc)}{hint}") from None


def _feed(path: Path, graph_inputs: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Match arrays to graph inputs: by our export names (the exporter drops unused inputs),
    else by position for files exported elsewhere."""
    ours = dict(zip(_names("input", len(arrays)), arrays))
    if all(name in ours for name in graph_inputs):
        return {name: ours[name] for name in graph_inputs}
    if len(graph_inputs) != len(arrays):
        raise StructADMMError(
            f"{path}: the ONNX model takes {len(graph_inputs)} inputs but {len(arrays)} were given"
        )
    return dict(zip(graph_inputs, arrays))


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if got.size == 0:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    both_nan = np.isnan(got) & np.isnan(want) if np.issubdtype(got.dtype, np.floating) else False
    return float(np.max(np.where(both_nan, 0.0, diff)))


# --- torch helpers ------------------------------------------------------------------------


def _run_torch(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> object:
    with torch.no_grad():
        return model(*inputs)


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    items = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise StructADMMError("example inputs must be a tensor or a tuple of tensors")
    if any(t.dim() == 0 for t in items):
        raise StructADMMError("example inputs need a batch dimension (dim 0); got a scalar")
    return items


# --- small utilities ----------------------------------------------------------------------


def _names(stem: str, count: int) -> list[str]:
    return [stem if i == 0 else f"{stem}_{i}" for i in range(count)]


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )


