"""Distributed feature extraction into the cache (cache.py).

Every rank of the job runs this. Rank 0 checks the cache folder against the fingerprint; the ranks
check the existing blocks in parallel (rank r the blocks b with b % W == r, checksums included) and
share out the blocks still missing evenly, whichever ranks made the others. Each rank writes its
blocks (fp16) as they fill, so a stop signal loses at most one block per rank, and a requeued job
does only what is missing. The eval transform is METHOD section 7's: resize, centre crop, normalise.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from data_pipelines.sources import Subset
from data_pipelines.torchvision import eval_loader
from sslscale.eval.cache import (
    FINGERPRINT_FILE,
    TRUNK,
    BlockWriter,
    CachedSplit,
    block_problem,
    block_ranges,
    drop_block,
    prepare_folder,
    remove_leftovers,
)
from sslscale.eval.features import LayerTaps, recompute_bn_statistics
from sslscale.train.monitor import format_duration


class ExtractionStopped(Exception):
    """A stop signal arrived during extraction; finished blocks are kept."""


def _all_gather(env, value):
    if not env.is_distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def _barrier(env) -> None:
    if env.is_distributed:
        dist.barrier()


def wait_for_every_rank(store, key: str, env, stop_requested, timeout_s: float) -> None:
    """A barrier that still hears stop signals: a rank done with its blocks waits here for the others
    (at most about one block's time, as the blocks are shared out evenly), and stops if signalled."""
    if not env.is_distributed:
        return
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < env.world_size:
        if stop_requested():
            raise ExtractionStopped("stopped while waiting for the other ranks' blocks; this rank's are saved")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {env.rank}: the other ranks did not finish their feature blocks within "
                               f"dist.timeout_s ({timeout_s:.0f} s); is one of them dead?")
        time.sleep(0.2)


def plan_blocks(folder: str, sizes: dict[str, int], block_rows: int, layers: list[str], env) -> tuple[list, list]:
    """(blocks to extract as (split, block), [(split, block, problem)] of existing blocks that are bad)."""
    mine = []
    for split, rows in sizes.items():
        for block, span in enumerate(block_ranges(rows, block_rows)):
            if block % env.world_size == env.rank:
                problem = block_problem(os.path.join(folder, split), block, span, layers, verify_checksums=True)
                if problem is not None:
                    mine.append((split, block, problem))
                    if problem != "missing":  # by the rank that checked it, before anyone rewrites it
                        drop_block(os.path.join(folder, split), block)
    found = sorted(item for part in _all_gather(env, mine) for item in part)
    return [(split, block) for split, block, _ in found], [item for item in found if item[2] != "missing"]


def build_cache(folder: str, parts: dict, taps: LayerTaps, sources: dict, cfg, env, device, layout, say,
                stop_requested=lambda: False, store=None) -> dict[str, CachedSplit]:
    """Make sure `folder` holds the features of `sources` ({split: source}) for `parts`, extracting
    what is missing on every rank; returns the cached splits (on every rank)."""
    layers = [TRUNK, *taps.layers]
    sizes = {split: len(source) for split, source in sources.items()}
    block_rows = cfg.eval.cache.block_rows
    if env.is_main:
        prepare_folder(folder, parts, say)
        for split in sources:
            remove_leftovers(os.path.join(folder, split))
            os.makedirs(os.path.join(folder, split), exist_ok=True)
    _barrier(env)
    todo, bad = plan_blocks(folder, sizes, block_rows, layers, env)
    total = sum(len(block_ranges(rows, block_rows)) for rows in sizes.values())
    for split, block, problem in bad:
        say(f"feature cache {folder}: {split} block {block} {problem}; extracting it again")
    if not todo:
        say(f"feature cache {folder}: reusing all {total} blocks ({', '.join(f'{n} {s}' for s, n in sizes.items())} "
            f"rows; fingerprint {parts_fingerprint(folder)[:12]})")
    else:
        say(f"feature cache {folder}: extracting {len(todo)} of {total} blocks on {env.world_size} rank(s)"
            + (f", reusing {total - len(todo)}" if len(todo) < total else ""))
        mine = todo[env.rank::env.world_size]
        if mine:
            if cfg.eval.recompute_bn_stats:
                train_loader = eval_loader(sources["train"], cfg.data, cfg.eval.batch_size)
                recompute_bn_statistics(taps.trunk, train_loader, device, memory_format=layout)
            taps.eval()
            for split in sources:
                blocks = [b for s, b in mine if s == split]
                if blocks:
                    extract_blocks(taps, sources[split], split, os.path.join(folder, split), blocks, sizes[split],
                                   cfg, device, layout, say if env.is_main else None, stop_requested)
    wait_for_every_rank(store, f"sslscale/extracted/{folder}/{parts_fingerprint(folder)}", env, stop_requested,
                        cfg.dist.timeout_s)
    return {split: CachedSplit.open(os.path.join(folder, split), rows, block_rows, layers)
            for split, rows in sizes.items()}


def parts_fingerprint(folder: str) -> str:
    with open(os.path.join(folder, FINGERPRINT_FILE)) as f:
        return json.load(f)["fingerprint"]


def extract_blocks(taps: LayerTaps, source, split: str, split_dir: str, blocks: list[int], rows: int, cfg, device,
                   layout, say, stop_requested) -> None:
    """Extracts `blocks` of one split in one loader pass; each block is committed as soon as it is full."""
    block_rows = cfg.eval.cache.block_rows
    spans = block_ranges(rows, block_rows)
    indices = torch.cat([torch.arange(*spans[b]) for b in blocks])
    loader = eval_loader(Subset(source, indices), cfg.data, cfg.eval.batch_size)
    pending = list(blocks)
    writer = None
    done, started, last_report = 0, time.perf_counter(), time.perf_counter()
    try:
        for images, labels in loader:
            features = taps(images.to(device, memory_format=layout, non_blocking=True))
            host = {}
            for name, value in features.items():
                value = value.to(torch.float16)
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{name} features of {split} images are not finite in fp16 (|x| > 65504 or "
                                     "NaN); this layer cannot be cached in fp16")
                host[name] = value.cpu()
            offset = 0
            while offset < len(labels):
                if writer is None:
                    block = pending.pop(0)
                    writer = BlockWriter(split_dir, block, spans[block], {n: v.shape[1] for n, v in host.items()})
                taken = writer.write({n: v[offset:] for n, v in host.items()}, labels[offset:])
                offset += taken
                if writer.full:
                    writer.commit()
                    writer = None
            done += len(labels)
            now = time.perf_counter()
            if say is not None and (now - last_report > 30 or done == len(indices)):
                rate = done / max(now - started, 1e-9)
                say(f"  {split}: {done}/{len(indices)} images on this rank, {rate:.0f} img/s, "
                    f"ETA {format_duration((len(indices) - done) / max(rate, 1e-9))}")
                last_report = now
            if stop_requested():
                saved = len(blocks) - len(pending) - (writer is not None)
                raise ExtractionStopped(f"stopped during {split} extraction; {saved} of {len(blocks)} {split} blocks "
                                        "of this rank are saved and will be reused")
    finally:
        if writer is not None:
            writer.abandon()
