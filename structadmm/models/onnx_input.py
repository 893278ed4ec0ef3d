"""Load a user's ``.onnx`` file as a PyTorch module to prune, treating the file as untrusted data.

The graph is converted with onnx2torch (a maintained converter; structadmm has no ONNX
interpreter of its own; it is installed with the ``cpu`` and ``gpu`` extras). Before anything
is converted or run, the file is checked, and every way it can be bad is one line of
:class:`~structadmm.errors.StructADMMError` (the CLI's exit status 2):

1. :func:`~.onnx_guard.read_model` reads it once, with its external data (every location
   resolved once, inside the file's folder), as data: a protobuf, with no custom op library ever
   loaded; it refuses custom ops, too many nodes, subgraphs nested too deep, element types such as
   bfloat16 or float8 anywhere, initializers whose data does not match their shape, and inputs
   with absurd shapes; and it renames every node, value and initializer to a safe identifier (no
   name from the file reaches the Python source torch.fx generates and runs), keeping the map
   back for messages and the file's own input and output names;
2. inputs need a dynamic batch axis (dim 0) and fixed other axes (or ``input_shape``);
3. :func:`~.onnx_sandbox.dry_run` checks and converts it first in a child process with a memory
   and a time limit: shape inference with data propagation must give every tensor a known size,
   at most ``max_tensor_bytes`` (default max(1 GiB, 4x the largest initializer)), none growing
   faster than the batch, and the estimated memory to convert and run it must stay under
   ``memory_limit``; then the child converts it and runs it once. A file that passes is converted
   again in this process, by the same code on the same bytes;
4. every op must have an onnx2torch converter at the file's opset; where onnx2torch lags
   the file's opset, the graph is first moved to the newest opset it covers with
   ``onnx.version_converter``; otherwise the error names the op. Before that, ``allowzero=1``
   is cleared from every Reshape whose shape is a constant without a 0 (where, by the ONNX
   spec, it has no effect): onnx2torch converts ``allowzero=0`` only. An initializer that several
   nodes read is converted once and shared, except where a layer makes it its own parameter
   (a Conv's weight, say): each such layer gets its own copy, as surgery prunes layers apart.

The converted module's global average pools become ``torch.nn`` ones (exact by the ONNX spec),
it is checked against ONNX Runtime running the checked model, at two batch sizes, and a few
more onnx2torch wrappers are swapped for the equivalent ``torch.nn``
layers (checked numerically) so that the channel tracer and surgery see ordinary layers.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterator, Sequence

import onnx
import torch
import torch.fx
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import StructADMMError, one_line
from ..exporters import OnnxSignature, onnx_signature
from . import onnx_sandbox
from .loaded import LoadedModel
from .onnx_convert import check_against_runtime, convert, example_batch, replace_wrappers
from .onnx_guard import (
    FILE_MARK,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    CheckedModel,
    quoted,
    read_bytes,
    read_model,
)

#: The two batch sizes the converted module is checked at against ONNX Runtime.
CHECK_BATCHES = (2, 3)
#: Memory the first conversion may take by default: this, plus 6x the file and its external data (the
#: model is held about five times over while it is checked, converted and run: the proto, onnx.checker's
#: copy, the module, ONNX Runtime's session and its optimized graph; AlexNet's 244 MB peaked at 1.55 GB).
BASE_MEMORY_LIMIT = 3 * 1024**3 // 2
#: Time it may take by default: this, plus as much again per GB of the file.
MIN_TIME_LIMIT = 60.0


def load_onnx_model(
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    max_bytes: int = MAX_BYTES,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    max_tensor_bytes: int | None = None,
    memory_limit: int | None = None,
    time_limit: float | None = None,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
) -> LoadedModel:
    """The model in the ONNX file at ``path`` as a prunable ``nn.Module`` (see the module docstring).

    ``input_shape`` is one sample's shape (no batch axis), needed only when the file leaves
    axes other than the batch dynamic. The result's ``onnx_file`` is ``path``: the pipeline
    times the file as given as the dense baseline and writes the pruned model with its input
    and output names, dtypes and dynamic axes.

    Limits (each refusal is one line): ``max_bytes`` for the file with its external data;
    ``max_tensor_bytes`` for any tensor the model makes (default max(1 GiB, 4x its largest
    initializer)); ``memory_limit`` bytes and ``time_limit`` seconds for the first, sandboxed
    conversion (defaults 1.5 GiB plus 6x the file, and 60 s plus 60 s per GB of the file);
    ``max_nodes`` nodes and subgraphs ``max_depth`` deep.
    """
    require_onnx2torch()
    onnx_sandbox.warm()  # the zygote's imports overlap this process's own (onnx2torch) and the reading below
    import onnx2torch  # noqa: F401
    path = Path(path)
    checked = read_model(path, max_bytes=max_bytes, max_nodes=max_nodes, max_depth=max_depth)
    signature = checked.signature
    shapes = _sample_shapes(signature, input_shape, path)
    with _file_names(checked, path):
        model = checked.proto.SerializeToString()
        request = onnx_sandbox.Request(
            sample_shapes=[list(s) for s in shapes], batch=max(CHECK_BATCHES), tensor=checked.tensor_limit(max_tensor_bytes),
            memory=memory_limit if memory_limit is not None else BASE_MEMORY_LIMIT + 6 * checked.total_bytes,
            seconds=time_limit if time_limit is not None else MIN_TIME_LIMIT * (1 + checked.total_bytes / 1e9),
        )
        answer = onnx_sandbox.dry_run(model, request)
        if "error" in answer or answer.get("ok") is not True:
            raise StructADMMError(str(answer.get("error", "the sandbox gave no verdict")))
        check = [example_batch(checked.proto, shapes, batch, seed=batch) for batch in CHECK_BATCHES]
        converted = convert(checked.proto, FILE_MARK, check[0])
        for inputs in check:
            check_against_runtime(converted, model, inputs, atol, rtol)
        module = replace_wrappers(converted, check[0])
    output = signature.outputs[0].dims if len(signature.outputs) == 1 else ()
    classes = output[1] if len(output) == 2 and isinstance(output[1], int) else None
    return LoadedModel(module.eval(), path.stem, shapes[0] if len(shapes) == 1 else None, classes, onnx_file=path)


def require_onnx2torch() -> None:
    """One line naming the extra to install when onnx2torch (which converts ONNX files) is missing."""
    if importlib.util.find_spec("onnx2torch") is None:
        raise StructADMMError(
            "an .onnx model needs onnx2torch, which converts it to PyTorch: pip install 'structadmm[cpu]' "
            "(or 'structadmm[gpu]'), or pip install onnx2torch"
        )


@contextlib.contextmanager
def _file_names(checked: CheckedModel, path: Path) -> Iterator[None]:
    """Errors raised inside name the file's own nodes and values, and its path."""
    try:
        yield
    except StructADMMError as exc:
        message = checked.names.restore_text(str(exc)).replace(FILE_MARK, str(path))
        raise type(exc)(message) from exc


def file_signature(path: str | Path) -> OnnxSignature:
    """The inputs and outputs of the ONNX file at ``path``, read as data (no external data)."""
    try:
        return onnx_signature(onnx.ModelProto.FromString(read_bytes(Path(path), MAX_BYTES)))
    except StructADMMError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf's decode errors
        raise StructADMMError(f"{path}: not a readable ONNX file (truncated or corrupt?): {one_line(exc)}") from exc


def example_inputs(path: str | Path, batch: int, *, input_shape: Sequence[int] | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs for the ONNX file at ``path``, one per graph input, at ``batch``."""
    signature = file_signature(path)
    return example_batch(signature, _sample_shapes(signature, input_shape, Path(path)), batch, seed)


def check_data_feeds(path: str | Path, data: Dataset | DataLoader, data_name: str) -> None:
    """One line unless the data's samples give as many inputs as the ONNX file takes."""
    names = [t.name if t.name.isprintable() and len(t.name) <= 60 else quoted(t.name) for t in file_signature(path).inputs]
    first = next(iter(data)) if isinstance(data, (DataLoader, IterableDataset)) else data[0]
    x = first[0] if isinstance(first, (tuple, list)) else first
    given = len(x) if isinstance(x, (tuple, list)) else 1
    if given != len(names):
        raise StructADMMError(
            f"{Path(path).name} takes {len(names)} input{'s' if len(names) > 1 else ''} ({', '.join(names)}) but the "
            f"samples of {data_name} give {given}; give data whose samples are (({', '.join(names)}), label) "
            "(module:function data)" if len(names) > 1 else
            f"{Path(path).name} takes one input ({names[0]}) but the samples of {data_name} give {given}"
        )


# --- inputs ---------------------------------------------------------------------------------------


def _sample_shapes(signature: OnnxSignature, input_shape: Sequence[int] | None,
                   path: Path) -> list[tuple[int, ...]]:
    """One sample's shape per input (without the batch axis)."""
    if not signature.inputs:
        raise StructADMMError(f"{path} takes no inputs; structadmm prunes models that take a batch of samples")
    shapes = []
    for spec in signature.inputs:
        if not spec.dims:
            raise StructADMMError(f"{path}: input {spec.name!r} is a scalar; inputs need a batch axis (dim 0)")
        if isinstance(spec.dims[0], int):
            raise StructADMMError(
                f"{path} was exported for batch size {spec.dims[0]} only (input {spec.name!r}), but the pipeline "
                "runs it at several batch sizes; export it with a dynamic batch axis (dynamic_axes={name: {0: 'batch'}})"
            )
        rest = spec.dims[1:]
        if all(isinstance(d, int) for d in rest):
            if input_shape is not None and len(signature.inputs) == 1 and tuple(input_shape) != tuple(rest):
                raise StructADMMError(
                    f"{path} takes {'x'.join(map(str, rest))} samples, not the given input shape "
                    f"{'x'.join(map(str, input_shape))}"
                )
            shapes.append(tuple(rest))
        elif input_shape is not None and len(signature.inputs) == 1 and len(input_shape) == len(rest) and all(
                d == g for d, g in zip(rest, input_shape) if isinstance(d, int)):
            shapes.append(tuple(int(d) for d in input_shape))
        else:
            raise StructADMMError(
                f"{path}: input {spec.name!r} has dynamic axes {list(spec.dims)} besides the batch; give the shape "
                "of one sample (--input-shape, e.g. 3x224x224)"
            )
    return shapes
