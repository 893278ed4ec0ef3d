"""Size attributes after surgery: one small rule per kind of module, kept in a registry.

Surgery slices tensors; a module's own size attributes (``out_features``, ``num_heads``, ...)
must then agree with them, or code that reads them (a ``reshape(B, N, 3, self.num_heads, -1)``)
no longer runs. :func:`fix_sizes` runs, for every module that lost channels and for every
module that holds one (an attention module owns ``num_heads`` while its ``qkv`` child holds the
weight), the rules that match it. A rule matches by class for torch's own modules and by the
attributes it reads for everybody else's (timm, transformers), so no library is imported here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers import CONVS, is_depthwise

#: (does this rule apply to the module?, the rule that updates its attributes in place). A rule
#: gets the module and ``was``: the shape a tensor of it (by its name under the module, such as
#: ``"qkv.weight"``) had before surgery
SIZE_RULES: list[tuple[Callable[[nn.Module], bool], Callable[..., None]]] = []


def size_rule(applies: type | tuple[type, ...] | Callable[[nn.Module], bool]) -> Callable:
    """Register the decorated function for modules of a class, or those ``applies`` accepts."""
    test = (lambda m: isinstance(m, applies)) if isinstance(applies, (type, tuple)) else applies

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        SIZE_RULES.append((test, fn))
        return fn

    return register


def fix_sizes(model: nn.Module, before: dict[str, torch.Size]) -> None:
    """Bring the size attributes of the modules whose tensors surgery resized, and of the
    modules holding them, in line with their tensors (children first). ``before`` holds the
    resized tensors' shapes before surgery, by their full names."""
    names = {prefix for name in before for prefix in _ancestors(name.rpartition(".")[0])}
    modules = dict(model.named_modules())
    for name in sorted(names, key=lambda n: -n.count(".") - (n != "")):
        module = modules.get(name)
        if module is None:
            continue
        prefix = f"{name}." if name else ""

        def was(tensor: str, module: nn.Module = module, prefix: str = prefix) -> torch.Size:
            owner, _, attr = tensor.rpartition(".")
            return before.get(prefix + tensor) or getattr(module.get_submodule(owner), attr).shape

        for applies, fix in SIZE_RULES:
            if applies(module):
                fix(module, was)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


@size_rule(nn.Linear)
def linear(module: nn.Linear, was: Callable) -> None:
    module.out_features, module.in_features = module.weight.shape


@size_rule(CONVS)
def conv(module: nn.Module, was: Callable) -> None:
    depthwise = is_depthwise(module)
    multiplier = module.out_channels // module.in_channels if depthwise else 1
    module.out_channels = module.weight.shape[0]
    if depthwise:
        module.in_channels = module.groups = module.out_channels // multiplier
    else:
        module.in_channels = module.weight.shape[1] * module.groups


@size_rule(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, was: Callable) -> None:
    group_size = module.num_channels // module.num_groups
    module.num_channels = module.weight.shape[0]
    module.num_groups = module.num_channels // group_size


@size_rule(nn.modules.batchnorm._NormBase)
def batch_norm(module: nn.Module, was: Callable) -> None:
    tensors = [t for t in (module.weight, module.running_mean) if t is not None]
    module.num_features = tensors[0].shape[0]


@size_rule(nn.PReLU)
def prelu(module: nn.PReLU, was: Callable) -> None:
    module.num_parameters = module.weight.shape[0]


def _has(*attributes: str) -> Callable[[nn.Module], bool]:
    return lambda m: all(isinstance(getattr(m, a, None), (int, nn.Module, nn.Parameter)) for a in attributes)


@size_rule(_has("num_heads", "qkv"))
def fused_qkv_attention(module: nn.Module, was: Callable) -> None:
    """timm's ``Attention``, ``WindowAttention`` and kin: one ``qkv`` Linear of 3 x heads x
    head_dim rows, whole heads removed."""
    if not isinstance(module.qkv, nn.Linear):
        return
    head_rows = was("qkv.weight")[0] // module.num_heads
    module.num_heads = module.qkv.out_features // head_rows
    if isinstance(getattr(module, "attn_dim", None), int):
        module.attn_dim = module.qkv.out_features // 3


@size_rule(_has("num_heads", "head_dim", "in_proj_weight"))
def packed_attention(module: nn.Module, was: Callable) -> None:
    """:class:`~.heads.HeadAttention`: a packed ``in_proj_weight`` of 3 x heads x head_dim rows."""
    module.num_heads = module.in_proj_weight.shape[0] // (3 * module.head_dim)


@size_rule(_has("num_attention_heads", "attention_head_size", "query"))
def separate_qkv_attention(module: nn.Module, was: Callable) -> None:
    """transformers' self-attention (BERT and kin): ``query``/``key``/``value`` Linears."""
    if not isinstance(module.query, nn.Linear):
        return
    module.num_attention_heads = module.query.out_features // module.attention_head_size
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = module.query.out_features
    if isinstance(getattr(module, "num_key_value_heads", None), int):
        module.num_key_value_heads = module.key.out_features // module.attention_head_size


@size_rule(_has("hidden_dim", "conv_proj"))
def patch_embedding_width(module: nn.Module, was: Callable) -> None:
    """torchvision's ``VisionTransformer``: ``hidden_dim`` (its residual width) reshapes the patches."""
    if isinstance(module.conv_proj, CONVS):
        module.hidden_dim = module.conv_proj.out_channels


def _out_axis(module: nn.Module) -> int | None:
    """The axis of a Linear-like layer's weight that holds its outputs (None: not such a layer)."""
    if isinstance(module, nn.Linear):
        return 0
    return 1 if _transposed_linear(module) else None


@size_rule(_has("split_size"))
def split_sizes(module: nn.Module, was: Callable) -> None:
    """A module that splits a child's outputs into pieces of ``split_size`` (GPT-2's attention:
    ``c_attn(x).split(self.split_size, dim=2)`` into q, k and v): a child whose outputs were
    ``k`` pieces of it (k >= 2) and lost some sets ``split_size`` to a k-th of its outputs now;
    ``num_heads`` follows when the module states its ``head_dim``."""
    for name, child in module.named_children():
        axis = _out_axis(child)
        if axis is None or module.split_size <= 0:
            continue
        old, new = was(f"{name}.weight")[axis], child.weight.shape[axis]
        pieces = old // module.split_size
        if old != new and pieces >= 2 and old == pieces * module.split_size and new % pieces == 0:
            module.split_size = new // pieces
            if isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "head_dim", None), int):
                module.num_heads = module.split_size // module.head_dim
            return


def _transposed_linear(module: nn.Module) -> bool:
    """A layer that stores its weight [in, out] and its width as ``nf`` (transformers' ``Conv1D``)."""
    weight = getattr(module, "weight", None)
    return isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor) and weight.dim() == 2


@size_rule(_transposed_linear)
def transposed_linear(module: nn.Module, was: Callable) -> None:
    module.nx, module.nf = module.weight.shape

