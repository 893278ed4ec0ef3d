"""Tracing a model into its channel graph (:mod:`.channels` says what that graph is).

The model is traced with ``torch.export``; :class:`~.registry.Walk` then runs every node's rule
from :mod:`.rules`, which is imported here so every rule is registered before the first trace.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import StructADMMError, one_line
from ..layers import eval_mode, quiet_torch, train_mode_trial
from . import rules  # noqa: F401  (importing it registers the op rules)
from .channels import ChannelGraph
from .heads import traced_as_heads
from .registry import Walk

__all__ = ["attributes_kept", "audit_rules", "trace"]


def trace(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` with ``torch.export`` and return its channel graph (module docstring).

    The model runs in eval mode for the trace (no BatchNorm statistics change) and is left in
    the mode it was in. Its ``nn.MultiheadAttention`` modules are traced as the
    :class:`~.heads.HeadAttention` that surgery turns them into (same parameters, same names)
    and are back in place afterwards; nothing else about the model is touched. Where the model's
    own code reads ``self.training``, its train-mode forward is traced too, and channels a layer
    only that forward runs (an auxiliary classifier) reads are left whole.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(model), traced_as_heads(model), attributes_kept(model):
        try:
            with quiet_torch(), torch.no_grad():
                program = torch.export.export(model, inputs, strict=False)
        except Exception as exc:  # export raises many types for untraceable Python
            _check_inputs_fit(model, inputs)
            raise StructADMMError(
                f"cannot trace {type(model).__name__} with torch.export ({one_line(exc)}); "
                "models with data-dependent Python control flow need that logic moved out of forward()"
            ) from None
        graph = Walk(program, model).run()
    if _reads_training(model):
        _freeze_train_only_inputs(model, inputs, graph)
    return graph


def _reads_training(model: nn.Module) -> bool:
    """Whether some module of ``model`` outside torch itself may branch on ``self.training``
    (its class's source says so, or the source cannot be read): only then can the train-mode
    graph hold layers the eval-mode trace does not see."""
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.startswith("torch."):
            continue
        try:
            if "training" in inspect.getsource(cls):
                return True
        except (OSError, TypeError):
            return True
    return False


def _freeze_train_only_inputs(model: nn.Module, inputs: tuple, graph: ChannelGraph) -> None:
    """Leave whole every group of ``graph`` (the eval-mode trace) whose channels also reach a
    layer that only the train-mode forward runs (an auxiliary classifier under
    ``if self.training``): cutting them would break the compacted model when it trains.
    A model whose train-mode forward does not trace keeps the eval-mode graph as it is
    (surgery's check then runs the compacted model in train mode)."""
    with train_mode_trial(model), traced_as_heads(model), attributes_kept(model):
        try:
            with quiet_torch(), torch.no_grad():
                program = torch.export.export(model, inputs, strict=False)
            train = Walk(program, model).run()
        except Exception:  # noqa: BLE001  (the eval-mode graph stands; surgery's check is the backstop)
            return
    seen = {s.module for s in graph.slices}
    extra = {s.module for s in train.slices} - seen
    if not extra:
        return
    keys: dict[tuple[str, str, int], str] = {}
    for group in train.groups:
        touched = [s for s, _, _ in train.slices_of(group)]
        readers = sorted({s.module for s in touched if s.module in extra})
        for s in touched:
            if readers and s.module in seen:
                keys.setdefault((s.module, s.tensor, s.axis), readers[0])
    for group in graph.groups:
        for s, _, _ in graph.slices_of(group):
            reader = keys.get((s.module, s.tensor, s.axis))
            if reader is not None and group.prunable:
                group.frozen = f"read by '{reader}', a layer only the train-mode forward runs (a train-only branch)"
                graph.notes.append(f"{group.frozen}: channels of {group.name} are not pruned")


def audit_rules(model: nn.Module, example_inputs: Any) -> list[str]:
    """Trace ``model`` as :func:`trace` does and list every rule call that left one of its tensor
    operands unread (the registry's contract): one line per call; [] when every rule kept it."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(model), traced_as_heads(model), attributes_kept(model), quiet_torch(), torch.no_grad():
        program = torch.export.export(model, inputs, strict=False)
        walk = Walk(program, model)
        walk.unread = []
        walk.run()
    return walk.unread


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Give every module its attributes back after the block: a model that caches values in
    ``forward()`` (a detector's anchors, a rotary table) would otherwise keep the trace's fake
    tensors, which nothing can run or copy afterwards. Parameters, buffers and submodules are
    restored by identity too; values that did not change are left alone."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]
    # caches kept in a dict or list attribute (timm's attention-bias caches) are filled in place
    contents = [(value, copy.copy(value)) for _, attrs, *_ in saved for key, value in attrs.items()
                if not key.startswith("_") and type(value) in (dict, list)]
    try:
        yield
    finally:
        for module, attrs, params, buffers, children in saved:
            for store, before in ((module.__dict__, attrs), (module._parameters, params), (module._buffers, buffers),
                                  (module._modules, children)):
                for key in [k for k in store if k not in before]:
                    del store[key]
                for key, value in before.items():
                    if store.get(key, _MISSING) is not value:
                        store[key] = value
        for container, before in contents:
            if not _same_items(container, before):
                container.clear()
                if isinstance(container, list):
                    container.extend(before)
                else:
                    container.update(before)


_MISSING = object()


def _same_items(now: dict | list, before: dict | list) -> bool:
    """Whether a container holds the very objects it held (compared by identity, never by value)."""
    if isinstance(now, list):
        return len(now) == len(before) and all(a is b for a, b in zip(now, before))
    return now.keys() == before.keys() and all(now[k] is v for k, v in before.items())


def _check_inputs_fit(model: nn.Module, inputs: tuple) -> None:
    """Run ``model`` on ``inputs`` (eval, no grad): a failure means the inputs do not fit it."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise StructADMMError(
            f"the example input (shape {shapes}) does not fit {type(model).__name__}: {one_line(exc)}"
        ) from None


# -- the op-rule registry --------------------------------------------------------------------

