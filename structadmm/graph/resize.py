"""Size attributes after surgery: one small rule per kind of module, kept in a registry.

Surgery slices tensors; a module's own size attributes (``out_features``, ``num_heads``, ...)
must then agree with them, or code that reads them (a ``reshape(B, N, 3, self.num_heads, -1)``)
no longer runs. :func:`fix_sizes` runs, for every module that lost channels and for every
module that holds one (an attention module owns ``num_heads`` while its ``qkv`` child holds the
weight), the rules that match it. A rule matches by class for torch's own modules and by the
attributes it reads for everybody else's (timm, transformers), so no library is imported here.

A model that carries a transformers ``config`` (``from_pretrained`` builds it from that config)
must then be described by it too: :func:`sync_config` asks the *config rules* (one per kind of
module, each naming the config attributes it states) what the config must hold, writes it, and
checks it by building the model from the new config on the meta device: every tensor must have
the shape it has now, or the config is left as it was and the reason is returned.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..errors import one_line
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



@size_rule(_has("intermediate_size"))
def intermediate_size(module: nn.Module, was: Callable) -> None:
    """A module that states the width of its hidden layer (transformers' ``LlamaMLP`` and kin:
    ``intermediate_size``): it follows a child whose outputs had that width."""
    for name, child in module.named_children():
        axis = _out_axis(child)
        if axis is not None and was(f"{name}.weight")[axis] == module.intermediate_size:
            module.intermediate_size = child.weight.shape[axis]
            return


# -- what a model's config must say ------------------------------------------------------------

#: (does this rule apply to the module?, the config attributes the module needs, by name). A
#: module's attributes are up to date (:func:`fix_sizes`) when the rules run
CONFIG_RULES: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], dict[str, int]]]] = []


def config_rule(applies: Callable[[nn.Module], bool]) -> Callable:
    """Register the decorated function as what the modules ``applies`` accepts need in the config."""

    def register(fn: Callable[[nn.Module], dict[str, int]]) -> Callable[[nn.Module], dict[str, int]]:
        CONFIG_RULES.append((applies, fn))
        return fn

    return register


@config_rule(_has("q_proj", "k_proj", "head_dim"))
def projected_heads(module: nn.Module) -> dict[str, int]:
    """Llama-style attention (Llama, Qwen2, Mistral: ``q_proj``/``k_proj``/``v_proj`` Linears,
    ``head_dim``): ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (stated, since
    the config would otherwise derive it from the hidden size and the head count)."""
    q, k = module.q_proj, module.k_proj
    if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)) or module.head_dim <= 0:
        return {}
    return {"num_attention_heads": q.out_features // module.head_dim,
            "num_key_value_heads": k.out_features // module.head_dim, "head_dim": module.head_dim}


@config_rule(_has("split_size", "head_dim", "c_attn"))
def split_heads(module: nn.Module) -> dict[str, int]:
    """GPT-2's attention: ``num_attention_heads`` (its ``split_size`` in heads)."""
    return {"num_attention_heads": module.split_size // module.head_dim} if module.head_dim > 0 else {}


@config_rule(_has("intermediate_size", "down_proj"))
def gated_mlp(module: nn.Module) -> dict[str, int]:
    """Llama-style MLP: ``intermediate_size``."""
    return {"intermediate_size": module.intermediate_size}


@config_rule(_has("c_fc", "c_proj"))
def transposed_mlp(module: nn.Module) -> dict[str, int]:
    """GPT-2's MLP (``c_fc``/``c_proj`` Conv1D layers): ``n_inner``."""
    return {"n_inner": module.c_fc.nf} if _transposed_linear(module.c_fc) else {}


def _configured(module: nn.Module) -> bool:
    """A model ``from_pretrained`` builds from its ``config`` (a transformers model, by its attributes)."""
    return callable(getattr(type(module), "from_pretrained", None)) and \
        callable(getattr(getattr(module, "config", None), "to_dict", None))


def config_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``model`` (``model`` itself included) built from a config."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _configured(module) and not any(name.startswith(f"{outer}.") or not outer for outer, _ in found):
            found.append((name, module))
    return found


def config_values(model: nn.Module) -> tuple[dict[str, int], str | None]:
    """What ``model``'s config must hold per the config rules, or the reason it cannot hold one value
    for every layer (layers that kept different numbers of heads or neurons)."""
    values: dict[str, int] = {}
    for name, module in model.named_modules():
        for applies, rule in CONFIG_RULES:
            if not applies(module):
                continue
            for key, value in rule(module).items():
                if values.setdefault(key, value) != value:
                    return values, (f"its layers keep different sizes ({key} {values[key]} and {value} in "
                                    f"'{name}'), and a config holds one {key} for every layer")
    return values, None


def sync_config(model: nn.Module) -> str | None:
    """Bring the config of every transformers model in ``model`` in line with its modules, so that
    ``save_pretrained``/``from_pretrained`` rebuild it. Returns None, or why a config cannot
    describe the model (that config is then left as it was)."""
    for name, hf in config_models(model):
        config = hf.config
        values, reason = config_values(hf)
        writes = {k: v for k, v in values.items() if hasattr(config, k) or k == "head_dim"}
        saved = {k: getattr(config, k) for k in writes if hasattr(config, k)}
        if reason is None:
            for key, value in writes.items():
                setattr(config, key, value)
            reason = _rebuilt_differs(hf)
        if reason is not None:
            for key in writes:
                if key in saved:
                    setattr(config, key, saved[key])
                elif key in vars(config):
                    delattr(config, key)
            return f"{type(config).__name__} of '{name or type(hf).__name__}' cannot describe the pruned model: {reason}"
    return None


def _rebuilt_differs(model: nn.Module) -> str | None:
    """Why the model built from its config (on the meta device: no memory, no weights) differs
    from ``model``'s tensors, or None when every tensor has its shape."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as exc:  # the library's own check of its config (head counts that do not divide)
        return f"{type(model).__name__} cannot be built from it ({one_line(exc, 200)})"
    have = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    built = {k: tuple(t.shape) for k, t in fresh.state_dict().items()}
    for key in sorted(have.keys() | built.keys()):
        if have.get(key) != built.get(key):
            return (f"built from it, {key} would be {list(built[key]) if key in built else 'missing'} "
                    f"where the pruned model holds {list(have[key]) if key in have else 'none'}")
    return None

