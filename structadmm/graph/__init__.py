"""The channel graph: which slices of which tensors belong to one channel.

* :mod:`.channels`: what the graph is (slices, channel groups, block constraints);
* :mod:`.registry`: the op-rule registry, its contract and the vocabulary rules use;
* :mod:`.rules`: one rule per ATen op (registered on import);
* :mod:`.trace`: tracing a model with ``torch.export`` into its channel graph;
* :mod:`.resize`, :mod:`.heads`, :mod:`.norms`: the size fix-ups surgery needs after it cuts.
"""

from .channels import ChannelGraph, ChannelGroup, Slice, slice_groups
from .registry import Chan, Walk, param_view, rule
from .trace import audit_rules, trace

__all__ = ["Chan", "ChannelGraph", "ChannelGroup", "Slice", "Walk", "audit_rules", "param_view", "rule",
           "slice_groups", "trace"]
