"""What every rank decides together, and what the step keeps on the device until the host reads it.

A GPU step is fast only if the host never waits for it: the decision to skip a non-finite step is
taken on the device (an all-reduced flag handed to the optimizer as `found_inf`), the counts of such
steps stay on the device, and the host reads them, with the stop requests of signals, every
`train.check_every_steps` steps in one transfer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sslscale.dist.process_group import DistEnv


def host_values(tensor: torch.Tensor) -> list[float]:
    """The one way device values reach the host, as a list of numbers (the device-handling test replaces it:
    meta tensors hold no values, and any other read of one fails)."""
    return tensor.reshape(-1).tolist()


class RankAgreement:
    """Decisions every rank must take together (skip a step, stop for requeue), and averages over ranks."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device

    def any_on_device(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks, on the device (no host read)."""
        if self.env.is_distributed:
            flags = flags.clone()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.env.is_distributed:
            return values
        values = values.to(self.device).clone()
        dist.all_reduce(values)
        return values / self.env.world_size


def has_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any element of any tensor is inf or NaN (one foreach max-norm pass, which cannot overflow as a
    sum of squares can), else 0.0, on their device."""
    from sslscale.dist.parallel import local
    norms = torch.stack(torch._foreach_norm([local(t) for t in tensors], ord=float("inf")))
    return (~torch.isfinite(norms).all()).float()


class NonFiniteSteps:
    """Steps whose loss was not finite on some rank. Their updates are skipped on every rank; the counts live
    on the device: [in a row now, in all, the most in a row since the host last read them]."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(3, device=device)

    def skip_flags(self, agree: RankAgreement, loss: torch.Tensor, grads: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip this step's update, the loss was not finite): 1.0 or 0.0 each, the same on every rank (one
        all-reduce), never read on the host. `grads`: under fp16 loss scaling, an overflow in them also skips
        the update; that is the loss scaler's normal calibration, not counted as a non-finite step."""
        flags = [(~torch.isfinite(loss.detach())).float()]
        if grads:
            flags.append(has_nonfinite(grads))
        flags = agree.any_on_device(torch.stack(flags))
        return flags.max(), flags[0]

    def record(self, nonfinite: torch.Tensor) -> None:
        in_row = (self.counts[0] + 1) * nonfinite
        self.counts = torch.stack([in_row, self.counts[1] + nonfinite, torch.maximum(self.counts[2], in_row)])

    def since_last_read(self, values: list[float]) -> tuple[int, int, int]:
        """(in a row now, in all, most in a row since the last read) from the host copy of `counts`, and
        starts the next window at the current streak."""
        in_row, total, worst = (int(v) for v in values)
        self.counts = torch.stack([self.counts[0], self.counts[1], self.counts[0]])
        return in_row, total, worst

    def state_dict(self) -> dict:
        in_row, total, _ = host_values(self.counts)
        return {"nonfinite_in_row": int(in_row), "nonfinite_total": int(total)}

    def load_state_dict(self, state: dict) -> None:
        in_row, total = float(state["nonfinite_in_row"]), float(state["nonfinite_total"])
        self.counts = torch.tensor([in_row, total, in_row], device=self.counts.device)
