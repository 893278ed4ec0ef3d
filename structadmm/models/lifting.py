"""Lift a ``torch.export`` program back to layers the pipeline can prune.

An exported program (``.pt2``) is a flat graph of ATen calls that read their weights as
attributes: ``aten.conv2d(x, features.0.weight, ...)``. Pruning needs layers, so this module
rebuilds them: every convolution, linear and batch-norm call becomes a ``nn.Conv*d`` /
``nn.Linear`` / ``nn.BatchNorm*d`` holding the program's tensors under the original names,
and the common element-wise, pooling and shape calls become their ``torch`` functions (a
``view`` to ``[batch, features]`` becomes a flatten). Calls with no rule are kept as they
are; the channel graph then leaves the channels reaching them alone, as for any unknown op.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

#: ATen calls whose torch function takes the same arguments.
_SAME_ARGS = {
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu, aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.hardtanh.default: F.hardtanh, aten.hardtanh_.default: F.hardtanh,
    aten.silu.default: F.silu, aten.gelu.default: F.gelu, aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid, aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add,
    aten.mul.Tensor: operator.mul, aten.mul_.Tensor: operator.mul, aten.sub.Tensor: operator.sub,
    aten.div.Tensor: operator.truediv, aten.max_pool1d.default: F.max_pool1d,
    aten.max_pool2d.default: F.max_pool2d, aten.max_pool3d.default: F.max_pool3d,
    aten.avg_pool2d.default: F.avg_pool2d, aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
    aten.cat.default: torch.cat, aten.mean.dim: torch.mean, aten.flatten.using_ints: torch.flatten,
    aten.dropout.default: F.dropout, aten.clone.default: torch.clone,
}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


_LAYERS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default,
           aten.batch_norm.default)


def lift(program: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A trainable module with real layers that computes what ``program`` computes."""
    root = nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    layer_calls = [n for n in program.graph.nodes if n.op == "call_function" and n.target in _LAYERS]
    taken = {a for n in layer_calls for a in n.args[1:5] if isinstance(a, torch.fx.Node) and a.op == "get_attr"}

    def tensor(node: Any) -> torch.Tensor | None:
        return None if node is None else _attr(program, str(node.target))

    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_module" and str(target).startswith("_guards"):
            continue  # export's input guards: the lifted module checks nothing
        if node.op == "get_attr":
            if node not in taken or any(user not in layer_calls for user in node.users):
                _set_attr(root, str(target), _attr(program, str(target)))
                env[node] = graph.get_attr(str(target))
        elif node.op == "call_function" and target in _LAYERS[:4]:
            weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
            w = tensor(weight)
            if target is aten.linear.default:
                layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            else:
                stride, padding, dilation, groups = list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):]
                layer = _CONVS[w.ndim - 2](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                                           padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
            _adopt(layer, {"weight": weight, "bias": bias}, tensor)
            env[node] = _install(root, graph, _module_name(str(weight.target)), layer, env[node.args[0]])
        elif node.op == "call_function" and target is aten.batch_norm.default:
            x, weight, bias, mean, var = node.args[:5]
            momentum = node.args[6] if len(node.args) > 6 else 0.1
            eps = node.args[7] if len(node.args) > 7 else 1e-5
            layer = _NORMS[node.meta["val"].ndim](tensor(mean).shape[0], eps=eps, momentum=momentum,
                                                   affine=weight is not None)
            _adopt(layer, {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}, tensor)
            env[node] = _install(root, graph, _module_name(str(mean.target)), layer, env[x])
        elif node.op == "call_function" and target is aten.view.default and _is_flatten(node):
            env[node] = graph.call_function(torch.flatten, (env[node.args[0]], 1))
        elif node.op == "call_function" and target in _SAME_ARGS:
            map_env = lambda value: torch.fx.node.map_arg(value, lambda n: env[n])  # noqa: E731
            env[node] = graph.call_function(_SAME_ARGS[target], map_env(node.args), map_env(node.kwargs))
        elif node.op == "output":
            # the program returns a flat tuple (its pytree codegen unpacks it); one output is the tensor
            outputs = node.args[0]
            single = isinstance(outputs, (tuple, list)) and len(outputs) == 1
            graph.output(torch.fx.node.map_arg(outputs[0] if single else outputs, lambda n: env[n]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    lifted = torch.fx.GraphModule(root, graph, class_name="LiftedProgram")
    lifted.graph.eliminate_dead_code()
    lifted.graph.lint()
    lifted.recompile()
    return lifted


def _is_flatten(node: torch.fx.Node) -> bool:
    src = node.args[0].meta.get("val")
    out = node.meta.get("val")
    return src is not None and out is not None and out.ndim == 2 and src.ndim > 2


def _module_name(tensor_path: str) -> str:
    return tensor_path.rpartition(".")[0] or tensor_path.replace(".", "_")


def _install(root: nn.Module, graph: torch.fx.Graph, name: str, layer: nn.Module, x: torch.fx.Node) -> torch.fx.Node:
    _set_attr(root, name, layer)
    return graph.call_module(name, (x,))


def _adopt(layer: nn.Module, tensors: dict[str, Any], lookup) -> None:
    with torch.no_grad():
        for name, node in tensors.items():
            if node is None:
                continue
            value = lookup(node).detach().clone()
            current = getattr(layer, name)
            if isinstance(current, nn.Parameter):
                setattr(layer, name, nn.Parameter(value))
            else:
                setattr(layer, name, value)


def _attr(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _set_attr(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if isinstance(value, nn.Module):
        parent.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        parent.register_parameter(name, value)
    else:
        parent.register_buffer(name, value)
