"""Every stateful part of a run, saved and restored in one call.

The model (with its heads and the objective's state, e.g. DINO's centre and teacher), the optimizer, and the
small parts the loop registers (grad scaler, progress counters, monitor summaries) each give state_dict() and
take load_state_dict(); the RNG streams of every rank are saved beside them. A resumed run therefore
continues bit for bit, and a part added later is saved by registering it, not by editing a list here.

Restoring takes the newest usable checkpoint (store.py finds them, integrity.py checks them): one that is
damaged, incomplete or unreadable is named in one line, set aside, and the next older one is tried; every
rank takes the same decision.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException  # DCP's load errors: a BaseException

from sslscale.checkpoint import dcp_io
from sslscale.checkpoint.integrity import CheckpointUnusable, describe_error
from sslscale.checkpoint.run_folder import check_fixed_on_resume
from sslscale.checkpoint.store import Checkpointer, CheckpointMismatch, check_signature, no_usable_checkpoint
from sslscale.dist.process_group import DistEnv
from sslscale.optim.optimizers import match_state_layout


class RNGStates:
    """Python, NumPy and torch (CPU and CUDA) generators, saved and restored together."""

    def state_dict(self) -> dict:
        # NumPy's state as plain data (a list, not an array): checkpoints load weights_only.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, [int(k) for k in keys], int(pos), int(has_gauss),
                                                           float(cached)),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]  # an array in checkpoints written before plain data
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """The model (`core`: the unwrapped module, sharded in place under FSDP), its optimizer and the registered
    `parts`, saved to and restored from the checkpoints of one run folder."""

    def __init__(self, core: torch.nn.Module, optimizer: torch.optim.Optimizer, parts: dict, *,
                 checkpointer: Checkpointer, env: DistEnv, shape_signature: dict, sharded: bool,
                 background: bool = False, stream=None, fixed: dict | None = None):
        self.fixed = fixed or {}  # FIXED_ON_RESUME settings, recorded in every checkpoint and checked on restore
        self.core, self.optimizer, self.parts = core, optimizer, parts
        self.checkpointer, self.env, self.shape_signature = checkpointer, env, shape_signature
        self.sharded, self.background, self.stream = sharded, background, stream
        self.rng = RNGStates()
        # Background writes of shards talk over a gloo group of their own, never over the step's group.
        self.async_group = torch.distributed.new_group(backend="gloo") if sharded and background else None

    def restore(self) -> str | None:
        """Resume from the newest usable checkpoint. One that is damaged (checksums), incomplete or unreadable
        is named in one line, set aside (renamed unusable-*) and the next older one is tried. All ranks take
        the same decision: rank 0 lists the candidates and checks the checksums, and every rank's read result
        is gathered before anyone goes on. If there are checkpoints and none is usable, stop: starting over
        would overwrite a run someone paid for."""
        names = self._from_rank_0(self.checkpointer.newest_first)
        problems = []
        for name in names:
            problem = self._from_rank_0(lambda: self._checksum_problem(name))
            state = None
            if problem is None:
                try:
                    state = self._read(name)
                except CheckpointMismatch as error:
                    problem = ("mismatch", str(error))
                except CheckpointUnusable as error:
                    problem = ("unusable", error.problem)
                except (Exception, CheckpointException) as error:  # noqa: BLE001  any other loader error
                    problem = ("unusable", describe_error(error))
            problem = self._first_over_ranks(problem)
            if problem is None:
                self._apply(*state)
                return name
            kind, text = problem
            if kind == "mismatch":
                raise CheckpointMismatch(text)
            problems.append(CheckpointUnusable(name, text))
            if self.env.is_main:  # every rank is done with it (the gather above): out of the way
                moved = self.checkpointer.set_aside(name)
                print(f"checkpoint {name} is unusable: {text}; set aside as ckpt/{moved}, trying an older one",
                      file=self.stream, flush=True)
        # A run whose checkpoints were all set aside by an earlier attempt (a requeue, a rerun) has been
        # trained: it must not start over silently either.
        set_aside = self._from_rank_0(self.checkpointer.set_aside_names)
        if names or set_aside:
            raise no_usable_checkpoint(self.checkpointer.dir, problems, set_aside)
        return None

    def _checksum_problem(self, name: str) -> tuple[str, str] | None:
        try:
            self.checkpointer.verify(name)
        except CheckpointUnusable as error:
            return ("unusable", error.problem)
        return None

    def _from_rank_0(self, compute):
        """Rank 0's answer, on every rank (the others do not compute it)."""
        if not self.env.is_distributed:
            return compute()
        box = [compute() if self.env.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _first_over_ranks(self, problem):
        """The lowest rank's problem, on every rank: one rank that cannot read makes all fall back together."""
        if not self.env.is_distributed:
            return problem
        problems = [None] * self.env.world_size
        torch.distributed.all_gather_object(problems, problem)
        return next((p for p in problems if p is not None), None)

    def _read(self, name: str) -> tuple[dict, dict, dict, bool]:
        """(model state, optimizer state, small parts, whether the states are full tensors) of either kind
        of checkpoint, for either kind of run: shards reshard onto any number of ranks, a single file
        loads into sharded parameters, shards consolidate into an unsharded run."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        ckpt = self.checkpointer
        if not (ckpt.is_sharded(name) and self.sharded):
            full = ckpt.load_full(name, verify=False)  # rank 0 has checked the checksums (restore)
            check_signature(full["shape_signature"], self.shape_signature, f"checkpoint {name}")
            check_fixed_on_resume(full.get("fixed_on_resume"), self.fixed, f"checkpoint {name}")
            return full["model"], full["optimizer"], full, True
        small = ckpt.load_small_parts(name)
        check_signature(small["shape_signature"], self.shape_signature, f"checkpoint {name}")
        check_fixed_on_resume(small.get("fixed_on_resume"), self.fixed, f"checkpoint {name}")
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        try:
            saved = dcp_io.saved_keys(ckpt.path(name))
        except (Exception, CheckpointException) as error:  # noqa: BLE001  a metadata file that cannot be read
            raise CheckpointUnusable(name, f"{dcp_io.METADATA_FILE} cannot be read ({describe_error(error)})") \
                from None
        missing = [k for k in model_state if f"model.{k}" not in saved]
        if missing:
            raise CheckpointMismatch(f"checkpoint {name} lacks model entries: {', '.join(missing[:5])}")
        # Partial: the optimizer template holds state for every parameter, the checkpoint only for those
        # that had gradients (DINO's last layer stays frozen at first); keep only what was saved.
        dcp_io.load_into({"model": model_state, "optimizer": optim_state}, ckpt.path(name), allow_partial=True)
        with_state = {key.rsplit(".", 1)[0] for key in saved if key.startswith("optimizer.state.")}
        optim_state["state"] = {k: v for k, v in optim_state["state"].items() if f"optimizer.state.{k}" in with_state}
        return model_state, optim_state, small, False

    def _apply(self, model_state: dict, optim_state: dict, small: dict, full: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        # Full tensors into a sharded model: each rank keeps its own shard of them.
        set_model_state_dict(self.core, model_state, options=StateDictOptions(full_state_dict=full and self.sharded))
        # Not strict: parameters without gradients so far (a frozen last layer) have no optimizer state.
        set_optimizer_state_dict(self.core, self.optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=full and self.sharded, strict=False))
        match_state_layout(self.optimizer)
        for key, part in self.parts.items():
            part.load_state_dict(small[key])
        rng = small["rng"]  # one state per rank; a run resumed on more ranks reuses them cyclically
        self.rng.load_state_dict(rng[self.env.rank % len(rng)])

    def rng_of_every_rank(self) -> list[dict]:
        if not self.env.is_distributed:
            return [self.rng.state_dict()]
        states = [None] * self.env.world_size
        torch.distributed.all_gather_object(states, self.rng.state_dict())
        return states

    def save(self, step: int) -> None:
        """Unsharded: rank 0 writes one file (every rank holds the same state). Sharded (FSDP): every rank
        writes its shards. Either kind in the background with checkpoint.async_save."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        small = {key: part.state_dict() for key, part in self.parts.items()}
        small.update(rng=self.rng_of_every_rank(), shape_signature=self.shape_signature, fixed_on_resume=self.fixed)
        if self.sharded:
            self.checkpointer.save_sharded(step, {"model": model_state, "optimizer": optim_state}, small,
                                           is_main=self.env.is_main, async_group=self.async_group)
            return
        background = self.background
        if self.env.is_main:
            self.checkpointer.save(step, {"model": model_state, "optimizer": optim_state, **small},
                                   background=background)
        if self.env.is_distributed and not background:
            torch.distributed.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
