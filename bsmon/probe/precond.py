"""The optimizer's own geometry for the noise scale (training side).

Adam-family optimizers step along the gradient rescaled element by element by
P = 1/(sqrt(v_hat) + eps), v_hat the bias-corrected second moment ``exp_avg_sq``.
B_pre = tr(P Sigma P)/|P G|^2 is B_simple of the rescaled gradient P*g. Each estimator gets it
from the same norms as B_simple, taken of rescaled gradients: the micro-batch estimator from
|P * .grad|^2 after each backward pass (``rescaled``), the per-example estimator from
|P * g_i|^2 inside backward and the data-parallel one from |P * bucket|^2 around the all-reduce
(both weight with ``squares``, P^2). P is read from the optimizer's state before its step
updates v, so every pass of a step sees the same P. An AMP loss scale multiplies .grad only
(the state holds unscaled moments), so it cancels in the ratio like any constant factor of .grad.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

REASON_NO_SECOND_MOMENT = (
    "{optimizer} keeps no per-element second moment (exp_avg_sq, with betas and eps in its param groups), "
    "so there is no optimizer geometry to measure: B_simple is the noise scale of its step")


def second_moment_groups(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group names Adam's betas and eps (the state is checked at each step)."""
    return all("betas" in group and "eps" in group for group in optimizer.param_groups)


class Preconditioner:
    """|P * .grad|^2 from an Adam-family optimizer's state, without a host-device sync."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self.reason: str | None = (None if second_moment_groups(optimizer) else
                                   REASON_NO_SECOND_MOMENT.format(optimizer=type(optimizer).__name__))
        self._group_of = self._groups_by_param()

    def _groups_by_param(self) -> dict[int, int]:
        return {id(p): index for index, group in enumerate(self._optimizer.param_groups) for p in group["params"]}

    @property
    def supported(self) -> bool:
        return self.reason is None

    def rescaled(self, measured: Sequence[Sequence[nn.Parameter]]) -> list[torch.Tensor] | None:
        """P * .grad = .grad / (sqrt(v_hat) + eps) for the parameters of ``measured`` (one list
        per param group) that have a gradient, as new tensors (the caller takes their norm).

        None before the first optimizer step, or when a parameter with a gradient has no
        second moment yet (the geometry of part of the model is not the model's). Sets
        ``reason`` for good when the state turns out to have no ``exp_avg_sq``.
        """
        if self.reason is not None:
            return None
        result = []
        for group, params in zip(self._optimizer.param_groups, measured):
            with_grad = [p for p in params if p.grad is not None]
            if not with_grad:
                continue
            denominators = self._denominators(group, with_grad)
            if denominators is None:
                return None
            torch._foreach_reciprocal_(denominators)
            torch._foreach_mul_(denominators, [p.grad.to(d.dtype) for p, d in zip(with_grad, denominators)])
            result += denominators
        return result or None

    def squares(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor] | None:
        """P^2 = 1/(sqrt(v_hat) + eps)^2 of each of ``params`` (new tensors, shaped like them), for
        norms in the optimizer's geometry taken elsewhere than on .grad (per-example norms, DDP's
        buckets). None where one has no second moment yet, or is not the optimizer's."""
        if self.reason is not None:
            return None
        group_of = self._group_of
        if any(id(param) not in group_of for param in params):  # a group added since: look again
            group_of = self._group_of = self._groups_by_param()
        by_group: dict[int, list[int]] = {}
        for position, param in enumerate(params):
            if id(param) not in group_of:
                return None
            by_group.setdefault(group_of[id(param)], []).append(position)
        result: list[torch.Tensor | None] = [None] * len(params)
        for index, positions in by_group.items():
            denominators = self._denominators(self._optimizer.param_groups[index], [params[i] for i in positions])
            if denominators is None:
                return None
            torch._foreach_mul_(denominators, denominators)
            torch._foreach_reciprocal_(denominators)
            for position, square in zip(positions, denominators):
                result[position] = square
        return result

    def _denominators(self, group: dict, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """sqrt(v_t)/sqrt(1 - beta2^t) + eps for each parameter, as new tensors; None if any lacks state."""
        state = self._optimizer.state
        moments, steps = [], []
        for p in params:
            s = state.get(p)
            if not s or "step" not in s:
                return None
            v = s.get("max_exp_avg_sq", s.get("exp_avg_sq"))  # amsgrad divides by the running maximum
            if v is None:
                self.reason = REASON_NO_SECOND_MOMENT.format(optimizer=type(self._optimizer).__name__)
                return None
            moments.append(v)
            steps.append(s["step"])
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        denominators = torch._foreach_sqrt(moments)
        if all(not torch.is_tensor(t) or t.device.type == "cpu" for t in steps):
            # the usual case: the step count is a host number, read without a device sync
            counts = [float(t) for t in steps]
            if min(counts) < 1:
                return None
            torch._foreach_mul_(denominators, [1.0 / math.sqrt(-math.expm1(t * math.log(beta2))) if beta2 > 0
                                               else 1.0 for t in counts])
        else:  # capturable / fused: the step count lives on the device; compute there
            corrections = torch._foreach_pow(beta2, [t.to(v.device, torch.float32) for t, v in zip(steps, moments)])
            torch._foreach_neg_(corrections)
            torch._foreach_add_(corrections, 1.0)
            torch._foreach_sqrt_(corrections)
            torch._foreach_div_(denominators, corrections)
        torch._foreach_add_(denominators, eps)
        return denominators
