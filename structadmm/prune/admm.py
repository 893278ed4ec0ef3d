"""ADMM for structured pruning (StructADMM, arXiv 1807.11091).

Pruning is posed as ``min loss(W)  s.t.  W_i in S_i`` and split with an auxiliary copy Z:

* W-step: SGD on ``loss(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2`` (:meth:`ADMM.penalty` is
  the second term; the caller adds it to its own loss for as many steps as it likes);
* Z-step: ``Z = Proj_S(W + U)``, the analytic Euclidean projection of the plan;
* U-step: ``U = U + W - Z``.

:meth:`ADMM.update` runs one Z/U round and grows rho by ``rho_growth`` up to ``rho_max``,
so the regulariser starts gentle and ends strong enough to pull W onto the sparse set; the
primal residual ||W - Z|| / ||W|| it returns must fall toward zero. :meth:`ADMM.hard_prune`
then projects W itself and returns the masks for masked retraining.

Progressive targets (``ramp_rounds`` = R > 1): the Z-steps of the first R rounds project onto
a plan part of the way to its ratios (:meth:`PruningPlan.on_the_way`, round r keeping
``(1 - ratio) ** (r / R)`` of each group), so at high ratios W is pulled onto the final set
in steps (0.9375: keep 1/2, 1/4, 1/8, then 1/16) instead of at once. The hard prune always
uses the plan itself.

Stages (``within``): an ADMM run inside the masks of an earlier hard prune projects Z, and
hard-prunes W, only among the weights those masks kept (:meth:`PruningPlan.masks_for`), so the
pruned set of every stage contains the previous stage's; the caller holds the pruned weights at
zero while it trains (:func:`~.masks.apply_masks`). The pipeline's ``admm_stages`` runs such
stages at rising ratios (ADMM, hard prune, a short masked retrain, ADMM at the next ratio).

:class:`AdmmSchedule` is the training recipe around it, as the reference implementations run
it: ``rounds`` rounds of ``epochs_per_round`` epochs of W-steps, the learning rate restarted
(one cosine) every round, and no hard prune until the primal residual is at most
``tolerance``: up to ``extra_rounds`` more rounds are run while it is not, and
:meth:`AdmmSchedule.outcome` says what happened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import StructADMMError

from .plan import Masks, PruningPlan


@dataclass(frozen=True)
class AdmmRound:
    round: int
    rho: float  # the rho the finished round's W-steps used
    primal_residual: float  # ||W - Z|| / ||W|| after this round's Z-step
    dual_residual: float  # rho * ||Z - Z_prev|| / ||W||


class ADMM:
    """ADMM state (Z, U, rho) for the parameters a plan constrains."""

    def __init__(self, model: nn.Module, plan: PruningPlan, *, rho: float = 0.05,
                 rho_growth: float = 1.6, rho_max: float = 5.0, ramp_rounds: int = 0, within: Masks | None = None):
        if not (rho > 0 and rho_growth >= 1 and rho_max >= rho):
            raise ValueError("need rho > 0, rho_growth >= 1 and rho_max >= rho")
        if ramp_rounds < 0:
            raise ValueError(f"ramp_rounds must be >= 0, got {ramp_rounds}")
        self.plan = plan
        self.ramp_rounds = ramp_rounds
        self.within = within  # the masks of an earlier stage: what they pruned stays pruned
        named = dict(model.named_parameters())
        self.params = {name: named[name] for name in plan.param_names()}
        if not self.params:
            reasons = [why for _, why in plan.skipped if why != "model output"] or [why for _, why in plan.skipped]
            why = ""
            if reasons:  # one reason at many layers is one kind of reason: name the commonest, at its first layer
                kinds = [r.split(" in '")[0] for r in reasons]
                top = Counter(kinds).most_common(1)[0][0]
                why = f" (most often: {reasons[kinds.index(top)]})"
            raise StructADMMError(f"the plan prunes nothing in this model{why}; `structadmm inspect` lists every reason")
        self.rho, self.rho_growth, self.rho_max = rho, rho_growth, rho_max
        self.round = 0
        self.history: list[AdmmRound] = []
        with torch.no_grad():
            self.U = {n: torch.zeros_like(p) for n, p in self.params.items()}
            self.Z = self._project({n: p.detach().clone() for n, p in self.params.items()})

    def target(self) -> PruningPlan:
        """The plan Z is projected onto for W-step round ``self.round + 1`` (the plan itself after the ramp)."""
        if self.ramp_rounds <= 1 or self.round + 1 >= self.ramp_rounds:
            return self.plan
        return self.plan.on_the_way((self.round + 1) / self.ramp_rounds)

    def _project(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks = self.target().masks_for(values, within=self.within)
        return {n: v * masks[n].to(v.device, v.dtype) for n, v in values.items()}

    def _follow_device(self) -> None:
        """Keep Z and U where the parameters are (training may move the model to a GPU)."""
        device = next(iter(self.params.values())).device
        if next(iter(self.Z.values())).device != device:
            self.Z = {n: z.to(device) for n, z in self.Z.items()}
            self.U = {n: u.to(device) for n, u in self.U.items()}

    def penalty(self) -> torch.Tensor:
        """``sum_i rho/2 ||W_i - Z_i + U_i||^2``: add it to the task loss in the W-step."""
        self._follow_device()
        terms = [(p - self.Z[n] + self.U[n]).pow(2).sum() for n, p in self.params.items()]
        return 0.5 * self.rho * torch.stack(terms).sum()

    @torch.no_grad()
    def update(self) -> AdmmRound:
        """One Z/U round; returns the residuals and grows rho for the next round."""
        self._follow_device()
        self.round += 1  # the Z-step below sets the target of round ``self.round + 1``'s W-steps
        z_prev = self.Z
        self.Z = self._project({n: p.detach() + self.U[n] for n, p in self.params.items()})
        w_norm = _norm(p.detach() for p in self.params.values()).clamp_min(1e-12)
        primal = _norm(p.detach() - self.Z[n] for n, p in self.params.items()) / w_norm
        dual = self.rho * _norm(self.Z[n] - z_prev[n] for n in self.params) / w_norm
        for n, p in self.params.items():
            self.U[n] += p.detach() - self.Z[n]
        record = AdmmRound(self.round, self.rho, float(primal), float(dual))
        self.history.append(record)
        rho_next = min(self.rho * self.rho_growth, self.rho_max)
        # U is the dual variable scaled by 1/rho: keep the unscaled dual rho*U unchanged
        for u in self.U.values():
            u.mul_(self.rho / rho_next)
        self.rho = rho_next
        return record

    @torch.no_grad()
    def hard_prune(self) -> Masks:
        """Project W onto the sparse set in place (W = Proj_S(W)) and return the masks."""
        masks = self.plan.masks_for({n: p.detach() for n, p in self.params.items()}, within=self.within)
        for n, p in self.params.items():
            p.mul_(masks[n].to(p.device, p.dtype))
        return masks

    def state_dict(self) -> dict[str, Any]:
        return {"Z": self.Z, "U": self.U, "rho": self.rho, "round": self.round,
                "history": [r.__dict__ for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.Z = {n: state["Z"][n].clone() for n in self.params}
        self.U = {n: state["U"][n].clone() for n in self.params}
        self.rho, self.round = float(state["rho"]), int(state["round"])
        self.history = [AdmmRound(**r) for r in state["history"]]


@dataclass(frozen=True)
class AdmmSchedule:
    """How many ADMM rounds, how long each, and when the W's are close enough to hard prune."""

    rounds: int
    epochs_per_round: int
    tolerance: float = 0.0  # hard prune once the primal residual is at most this; 0: after `rounds`
    extra_rounds: int = 0  # at most this many more rounds while the residual is above tolerance
    restart: bool = True  # restart the cosine learning rate every round

    def max_epochs(self) -> int:
        return (self.rounds + self.extra_rounds) * self.epochs_per_round

    def converged(self, admm: ADMM) -> bool:
        return bool(admm.history) and admm.history[-1].primal_residual <= self.tolerance

    def train_kwargs(self, admm: ADMM, on_round: Callable[[ADMM], None] | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`.train.train_epochs` over :meth:`max_epochs` epochs."""
        per_round = self.epochs_per_round

        def after_epoch(epoch: int) -> None:
            if (epoch + 1) % per_round == 0:
                admm.update()
                if on_round is not None:
                    on_round(admm)

        def should_stop() -> bool:
            return admm.round >= self.rounds and (admm.round >= self.rounds + self.extra_rounds
                                                  or self.converged(admm))

        return {"penalty": admm.penalty, "after_epoch": after_epoch, "should_stop": should_stop,
                "restart_every": per_round if self.restart else None}

    def outcome(self, admm: ADMM) -> dict[str, Any]:
        """Rounds run, extra rounds taken, the final primal residual and whether it met the tolerance."""
        last = admm.history[-1].primal_residual if admm.history else None
        return {"rounds": admm.round, "extra_rounds": max(0, admm.round - self.rounds),
                "primal_residual": last, "tolerance": self.tolerance,
                "converged": last is not None and last <= self.tolerance}


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64)))
