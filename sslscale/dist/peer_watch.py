"""Which rank broke a collective: a heartbeat in the rendezvous store, read when a collective fails."""
from __future__ import annotations

import re
import threading
import time

import torch.distributed as dist

from sslscale.dist.process_group import DistEnv, bounded


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""


def is_collective_failure(error: BaseException) -> bool:
    """torch raises DistError subclasses for NCCL and store failures, but gloo's are plain RuntimeErrors
    that name gloo's transport ("[.../gloo/transport/tcp/pair.cc:545] Read error ...")."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and re.search(r"gloo|NCCL|[Tt]imed out", str(error)) is not None


class PeerWatch:
    """Names the rank that broke a collective. Every rank bumps a counter in the rendezvous store from
    a background thread; when a collective fails, the survivors look at whose counter stopped moving
    (a dead process) and at which ranks did not finish the current step (a hung one).

    The store outlives a dead rank under torchrun (the agent serves it); under srun rank 0 serves it,
    so if rank 0 dies the store goes with it, and that is what the message then says. Every store read and
    write is bounded (`bound_s`): a store on a node that dropped off the network answers nothing, and an
    unbounded read would leave this rank mute forever."""

    def __init__(self, env: DistEnv, store: dist.Store, interval_s: float = 1.0, bound_s: float = 3.0):
        self.env, self.interval_s, self.bound_s = env, interval_s, bound_s
        self.store = dist.PrefixStore("sslscale/peers", store)
        self.step = 0
        self._stop = threading.Event()
        self._beats = 0
        self._thread = threading.Thread(target=self._beat, name="sslscale-peer-watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._beats += 1
            beat, step = str(self._beats), str(self.step)
            try:
                bounded(lambda: (self.store.set(f"beat/{self.env.rank}", beat),
                                 self.store.set(f"step/{self.env.rank}", step)), self.bound_s, "the rendezvous store")
            except Exception:  # noqa: BLE001  the store is gone or mute; the failing collective reports it
                return
            self._stop.wait(self.interval_s)

    def finished_step(self, step: int) -> None:
        self.step = step

    def _read(self, kind: str) -> dict[int, int]:
        keys = [f"{kind}/{r}" for r in range(self.env.world_size)]
        values = bounded(lambda: self.store.multi_get(keys), self.bound_s, "the rendezvous store")
        return {r: int(v) for r, v in enumerate(values)}

    def diagnose(self) -> str:
        """Which ranks stopped (dead) or lag behind this one (hung); returns within 3 beat intervals plus 3
        bounded reads, whatever became of the store."""
        others = [r for r in range(self.env.world_size) if r != self.env.rank]
        try:
            before = self._read("beat")
            time.sleep(3 * self.interval_s)
            after, steps = self._read("beat"), self._read("step")
        except Exception as error:  # noqa: BLE001
            return (f"the rendezvous store at {self.env.master_addr}:{self.env.master_port} is unreachable too "
                    f"({type(error).__name__}: {str(error)[:120]}), so rank 0 (which serves it, unless torchrun "
                    f"does) or its host {self.env.master_addr} is probably lost")
        dead = [r for r in others if after[r] == before[r]]
        if dead:
            return "; ".join(f"rank {r} stopped responding (dead?); it last reported step {steps[r]}" for r in dead)
        behind = [r for r in others if steps[r] < self.step]
        if behind:
            return "; ".join(f"rank {r} is alive but still at step {steps[r]} (hung?)" for r in behind)
        return "every rank is alive and at this step; see the error above"

    def close(self) -> None:
        """Stop beating and wait for the thread: a thread left inside a store call while the process exits
        (or while rank 0, which may serve the store, exits) can abort the process at teardown."""
        self._stop.set()
        self._thread.join(timeout=10 * self.interval_s)
