"""Bytes the DISSL loss moves between ranks per step: the global marginal by all-reduce of each rank's sum of
teacher probabilities, against gathering every rank's [B, C] probabilities (what it replaced), side by side.

    python benchmarks/dissl_marginal_traffic.py                       # the d8192 m8 recipe: B = 320, C = 16384
    python benchmarks/dissl_marginal_traffic.py --config configs/dissl_resnet50_dNone_e100_m2.yaml

Two gloo processes run the loss on random logits of the recipe's shapes; every tensor the loss hands to a
collective is recorded (shape, dtype), and both ways must give the same marginal entropy. The bytes a rank
sends are then worked out for the recipe's world size with the ring algorithms NCCL uses: an all-gather of
S bytes per rank sends (W - 1) S, its backward (a reduce-scatter) as much again; an all-reduce of T bytes
sends 2 (W - 1) / W T, its backward the same.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sslscale.config import load_config  # noqa: E402
from sslscale.dist.collectives import AllGatherWithGrad  # noqa: E402
from sslscale.objectives.dissl import dissl_loss, entropy  # noqa: E402


class RecordingGather(AllGatherWithGrad):
    """The training step's collectives, recording what the loss hands them."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, int]] = []

    def __call__(self, x):
        self.calls.append(("all_gather", tuple(x.shape), x.element_size()))
        return super().__call__(x)

    def sum(self, x):
        self.calls.append(("all_reduce", tuple(x.shape), x.element_size()))
        return super().sum(x)


def marginal_by_gather(teacher_logits, tau_t, gather):
    """The replaced way: every rank's [B, C] probabilities gathered, then averaged."""
    probs = [torch.softmax(t.float() / tau_t, dim=-1) for t in teacher_logits]
    return torch.stack([entropy(gather(p).mean(0)) for p in probs]).mean()


def ring_bytes_sent(calls, world: int) -> int:
    """Bytes one rank sends for these collectives and their backward (same volume), ring algorithms."""
    total = 0
    for op, shape, element_size in calls:
        size = element_size * int(torch.tensor(shape).prod())
        per_direction = (world - 1) * size if op == "all_gather" else 2 * (world - 1) / world * size
        total += 2 * per_direction  # forward + backward
    return int(total)


def rank_main(rank, world, port, batch, classes, n_large, n_crops, tau_t, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    teacher = [torch.randn(batch, classes, requires_grad=True) for _ in range(n_large)]
    student = [torch.randn(batch, classes, requires_grad=True) for _ in range(n_crops)]
    now = RecordingGather()
    loss, logs = dissl_loss(teacher, student, lam=2.3, beta=0.6, tau_t=tau_t, tau_s=1.0, gather=now)
    loss.backward()
    before = RecordingGather()
    h_before = marginal_by_gather(teacher, tau_t, before)
    h_before.backward()
    queue.put((rank, now.calls, before.calls, float(logs["H_M"]), float(h_before.detach())))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dissl_resnet50_d8192_e800_m8.yaml")
    parser.add_argument("--world-size", type=int, default=None, help="ranks to work the bytes out for "
                        "(default: the recipe's GPUs, slurm nodes x tasks)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    world = args.world_size or cfg.slurm.nodes * cfg.slurm.tasks
    batch, classes = cfg.data.batch_size // world, cfg.objective.dissl.n_classes
    n_large, n_crops = cfg.data.crops[0].count, sum(g.count for g in cfg.data.crops)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(2, port, batch, classes, n_large, n_crops, cfg.objective.dissl.tau_t,
                                        queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    _, now, before, h_now, h_before = results[0]
    assert abs(h_now - h_before) < 1e-5 * abs(h_before), (h_now, h_before)
    assert results[0][3] == results[1][3], "ranks disagree on the marginal"
    print(f"{args.config}: per-rank batch B = {batch}, C = {classes}, {n_large} teacher crops of {n_crops}; "
          f"worked out for {world} ranks (2 gloo ranks ran it, H_M equal both ways: {h_now:.6f})")
    print(f"{'marginal by':<34}{'collectives (per step)':<48}{'payload / rank':>16}{'sent / rank (ring)':>20}")
    for name, calls in (("gather of [B, C] probabilities", before), ("all-reduce of local sums", now)):
        described = ", ".join(f"{op} {list(shape)}" for op, shape, _ in calls)
        payload = sum(e * int(torch.tensor(s).prod()) for _, s, e in calls)
        print(f"{name:<34}{described:<48}{payload / 1e6:>13.3f} MB{ring_bytes_sent(calls, world) / 1e6:>17.3f} MB")
    ratio = ring_bytes_sent(before, world) / ring_bytes_sent(now, world)
    print(f"forward + backward: the all-reduce sends {ratio:,.0f}x fewer bytes per rank per step")


if __name__ == "__main__":
    main()
