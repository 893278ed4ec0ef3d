"""The channel dependency graph: which slices of which tensors belong to one channel.

The model is traced with ``torch.export`` into ATen ops (the same IR that ``.pt2`` programs
hold), so functional calls (``F.batch_norm``, ``F.conv2d``, ``F.linear``), custom modules and
Python-level shape logic all reduce to one bounded vocabulary of core ops. Parameters come
back to the user's own modules by their qualified names, so surgery slices the user's modules.

Every channel a Conv or Linear produces gets an *entry* id, and every tensor records the entry
at each position of its channel axis (a numpy array; 2-D after a reshape splits the axis).
What each op does to the entries is one small rule per op in :mod:`.rules` (a registry,
supporting a new op is one function there). In short:

* Conv / Linear read their input entries (*in* slices of the weight) and create new ones
  (*out* slices of weight and bias); a depthwise conv passes its input entries through;
* per-channel tensors (BatchNorm, GroupNorm, PReLU, a layer-scale parameter) carry a
  *through* slice and pass entries on; activations, pooling, dropout just pass them on;
* element-wise binary ops (residual add, gating) *tie* their operands' entries position by
  position; ``cat`` on the channel axis concatenates, elsewhere it ties;
* reshapes and permutes move the entries with the data (flatten repeats a channel's entry
  over its spatial features; a channel shuffle permutes them); splitting the channel axis
  ties the entries in each column so every block keeps the same channels in the same order;
* ``chunk`` on the channel axis and grouped convs require their blocks to keep equal counts;
* a parameter used twice (shared weights, one BatchNorm applied to two tensors) ties the
  entries of its uses.

Values that carry no entries are of two kinds. A :class:`ParamView` is a parameter seen through
ops that only move its values (``cls_token.expand``, a relative-position table gathered and
permuted): where one of its axes lines up with a channel axis it gets a *through* slice. An
:class:`Opaque` tensor is one whose layout the rules cannot follow (a model input, an op without
a rule): whatever it meets is frozen, and a layer reading it just cannot lose input channels.

Tied entries form one *channel* (an atom: kept or removed together). Channels linked
through any producer or tie form a :class:`ChannelGroup`, the unit a plan prunes. An op the
rules do not cover *freezes* every group that reaches it (never pruned), with the reason.
"""

from __future__ import annotations

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["ChannelGraph", "ChannelGroup", "Slice", "equal_count_atoms", "slice_groups"]


@dataclass(frozen=True, eq=False)
class Slice:
    """The channel entries along one axis of one parameter or buffer.

    ``role`` is ``"out"`` (a layer's outputs: weight rows, bias), ``"through"`` (a
    per-channel tensor the channels pass: BatchNorm statistics, a depthwise kernel, a
    layer-scale) or ``"in"`` (a layer's input columns). ``entries[p]`` is the entry at
    position ``p`` of ``axis``. For a grouped conv's input (``groups`` > 1) position
    ``p`` is column ``p % (C/groups)`` of the rows of block ``p // (C/groups)``.
    """

    module: str
    tensor: str
    axis: int
    entries: np.ndarray
    role: str
    groups: int = 1
    weight: bool = False  #: the weight matrix of a Conv or Linear (not its bias or a norm's tensor)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor

    def _grouped(self) -> int:
        return self.groups if self.role == "in" else 1

    def positions(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` rearranged as [positions, everything else]."""
        g = self._grouped()
        if g > 1:  # weight [F, C/g, *k]: position b*(C/g) + l is column l of row block b
            rows, cols = tensor.shape[0], tensor.shape[1]
            return tensor.reshape(g, rows // g, cols, -1).permute(0, 2, 1, 3).reshape(g * cols, -1)
        return tensor.movedim(self.axis, 0).reshape(tensor.shape[self.axis], -1)

    def norms(self, tensor: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm of every position (float64)."""
        return self.positions(tensor.detach()).double().pow(2).sum(1)

    def mask(self, shape: torch.Size, keep: torch.Tensor) -> torch.Tensor:
        """A float mask of ``shape`` that zeroes the positions where ``keep`` is False."""
        g = self._grouped()
        flat = keep.to(torch.float32).view(-1, 1)
        if g > 1:
            rows, cols = shape[0], shape[1]
            rest = math.prod(shape[2:])
            return flat.expand(g * cols, rows // g * rest).reshape(g, cols, rows // g, rest).permute(0, 2, 1, 3).reshape(shape)
        moved = (shape[self.axis],) + tuple(d for i, d in enumerate(shape) if i != self.axis)
        return flat.expand(shape[self.axis], math.prod(moved[1:])).reshape(moved).movedim(0, self.axis)

    def select(self, tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tensor`` without the positions where ``keep`` is False."""
        g = self._grouped()
        if g > 1:
            rows, cols = tensor.shape[0], tensor.shape[1]
            blocks = tensor.reshape(g, rows // g, cols, *tensor.shape[2:])
            index = keep.view(g, cols).nonzero()[:, 1].view(g, -1)  # equal counts per block
            return torch.stack([blocks[b][:, index[b]] for b in range(g)]).reshape(rows, index.shape[1], *tensor.shape[2:])
        return tensor.index_select(self.axis, keep.nonzero().flatten())


@dataclass
class ChannelGroup:
    """Channels that are pruned together: one plan unit."""

    id: int
    channels: np.ndarray  # atom ids; a group's size is its number of channels
    name: str
    producers: list[str]
    consumers: list[str]
    frozen: str | None = None  # why the group must not be pruned; None if it may be

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return self.frozen is None


@dataclass
class ChannelGraph:
    """The traced model's channels, groups, slices and block constraints."""

    groups: list[ChannelGroup]
    slices: list[Slice]
    atom_of: np.ndarray  # entry id -> atom id
    local_of: np.ndarray  # atom id -> index within its group
    group_of: np.ndarray  # atom id -> group id
    blocks: list[list[np.ndarray]]  # each: blocks of atoms that must keep equal counts
    modules: dict[str, nn.Module]
    notes: list[str] = field(default_factory=list)
    #: group id -> the first op that gives the group's channel count as a number (view, reshape,
    #: expand): the model's code may have written that number down (see ``surgery.freeze_fixed_sizes``)
    sized: dict[int, str] = field(default_factory=dict)
    #: group id -> the first LayerNorm that normalises over the group's channels (a transformer's
    #: residual stream): prunable only as a whole stream, and only when asked (``residual``)
    normalised: dict[int, str] = field(default_factory=dict)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def groups_of(self, module: str, role: str) -> list[ChannelGroup]:
        ids = {int(self.group_of[a]) for s in self.slices if s.module == module and s.role == role
               for a in np.unique(self.atom_of[s.entries])}
        return [self.groups[i] for i in sorted(ids)]

    def blocks_in(self, group: ChannelGroup) -> list[list[torch.Tensor]]:
        """The equal-count constraints on ``group``, as local channel indices."""
        return [[torch.from_numpy(self.local_of[b]) for b in constraint] for constraint in self.blocks
                if self.group_of[constraint[0][0]] == group.id]

    def producer_blocks(self, group: ChannelGroup) -> list[torch.Tensor]:
        """Per producing layer, the group's channels it makes (each must keep at least one:
        a layer with no outputs cannot exist)."""
        return [torch.from_numpy(np.unique(local)) for s, _, local in self.slices_of(group)
                if s.role == "out" and s.weight]

    def slices_of(self, group: ChannelGroup) -> list[tuple[Slice, np.ndarray, np.ndarray]]:
        """(slice, positions in the group, their channel index within the group) per slice."""
        out = []
        for s in self.slices:
            atoms = self.atom_of[s.entries]
            pos = np.nonzero(self.group_of[atoms] == group.id)[0]
            if len(pos):
                out.append((s, pos, self.local_of[atoms[pos]]))
        return out

    def positions_kept(self, s: Slice, keep: Mapping[int, Any]) -> torch.Tensor:
        """Boolean over the positions of slice ``s``: False where the channel there belongs to a
        group in ``keep`` whose decision (a boolean vector over the group's channels) drops it.
        The one mapping from a keep decision to tensor positions: masks, surgery and the MAC
        model all read it."""
        atoms = self.atom_of[s.entries]
        groups = self.group_of[atoms]
        keep_pos = torch.ones(len(s.entries), dtype=torch.bool)
        for gid in np.unique(groups).tolist():
            if gid in keep:
                where = np.nonzero(groups == gid)[0]
                decision = torch.as_tensor(keep[gid], dtype=torch.bool)
                keep_pos[torch.from_numpy(where)] = decision[torch.from_numpy(self.local_of[atoms[where]])]
        return keep_pos

    def tensor(self, s: Slice) -> torch.Tensor:
        return getattr(self.modules[s.module], s.tensor)


def slice_groups(graph: ChannelGraph, s: Slice) -> np.ndarray:
    """The channel group id at every position of slice ``s``."""
    return graph.group_of[graph.atom_of[s.entries]]



def equal_count_atoms(blocks: list[np.ndarray]) -> list[np.ndarray] | None:
    """Blocks of entries (as atom ids) that must keep equal numbers of *entries*, as blocks of
    atoms that must keep equal numbers of atoms: [] when any choice keeps the counts equal,
    None when no atom-count constraint says it (an atom with uneven weight across blocks).

    An atom may own several entries (a channel shuffle ties them). One with the same number of
    entries in every block removes as many from each, so it is free; the rest must each lie in
    one block only, all with the same number of entries there.
    """
    ids = np.unique(np.concatenate(blocks))
    counts = np.stack([np.bincount(np.searchsorted(ids, b), minlength=len(ids)) for b in blocks])
    uneven = ~(counts == counts[:1]).all(0)
    if not uneven.any():
        return []
    rest = counts[:, uneven]
    if ((rest > 0).sum(0) != 1).any() or len(np.unique(rest[rest > 0])) != 1:
        return None
    return [ids[uneven][rest[i] > 0] for i in range(len(blocks))]

