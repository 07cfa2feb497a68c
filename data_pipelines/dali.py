"""NVIDIA DALI backend: decode each image once, then one independent augmentation chain per crop.

On a GPU the decode is "mixed" (nvJPEG and the hardware JPEG decoder) and every op runs on the
GPU; on a CPU the same graph runs on DALI's CPU backend (`device_id=None`), which is what CI tests.

What stays in Python, and why (dali_feeder.py, run in DALI's worker processes ahead of the step):
- Which images a step reads: the SampleStream of sources.py (shared with the torchvision backend),
  fed through `external_source`. DALI's own readers shuffle with a buffer and shard by a fixed
  number of shards; ours is exact across epochs and resumes on any number of ranks from one
  number, the step. That is the whole reader state a checkpoint needs.
- Every random number: params.py draws them per stream position for both backends, so the two
  backends crop, flip, jitter, blur and solarize the same sample the same way.
- Unreadable images: files are read and their headers checked before DALI sees them. What DALI
  still fails to decode is found after the fact (see MultiCropPipeline.__next__) and replaced.

The per-crop chain mirrors torchvision v2's uint8 semantics (each colour op floors to whole
values and clamps to [0, 255], contrast blends towards the mean of the floored grayscale, hue
rotates in HSV, blur rounds), written with DALI's arithmetic ops where DALI's fused colour ops
compute something else (fn.hue rotates in YIQ space, fn.contrast centres on grey 128).

The crops leave DALI in the layout and dtype the model wants (NHWC memory for channels_last,
float16 where asked) and are handed to torch without a copy (DLPack), so moving a batch to the
model's device and layout is a no-op on the GPU path.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from data_pipelines import worker_signals
from data_pipelines.augment import SOLARIZE_THRESHOLD, AugmentSpec, CropGroup, blur_taps
from data_pipelines.batch import Batch
from data_pipelines.dali_feeder import StepFeeder
from data_pipelines.params import BRIGHTNESS, CONTRAST, HUE
from data_pipelines.sources import ImageSource, UnreadableImage, first_readable

log = logging.getLogger(__name__)

# Pipeline rebuilds after decode failures that the header checks did not catch, before giving up.
MAX_PIPELINE_REBUILDS = 16
PREFETCH = 2  # batches DALI prepares ahead
# The dtypes DALI writes crops in. DALI has no bfloat16: a bf16 run gets float16 (see crop_dtype).
CROP_DTYPES = (torch.float32, torch.float16)
JITTER_FACTORS = ["brightness", "contrast", "saturation", "hue"]  # feeder columns, in params.py's op order


class BackendUnavailable(RuntimeError):
    """The config asks for DALI (or DALI on a GPU) and this machine does not have it."""


def require_dali(device: str) -> None:
    """Fail with a clear message before any pipeline is built."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(
            "data.backend: 'dali' but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, or "
            f"pip install -e '.[dali]'); or use data.backend: torchvision ({error})") from None
    if device == "gpu" and not torch.cuda.is_available():
        raise BackendUnavailable("data.device: 'gpu' but no CUDA device is available; "
                                 "use data.device: cpu (DALI's CPU backend) or run on a GPU node")


def build_pipeline(feeder: StepFeeder, spec: AugmentSpec, *, device: str, device_id: int | None,
                   num_threads: int, seed: int, feeder_workers: int = 0, channels_last: bool = False,
                   dtype: torch.dtype = torch.float32, prefetch: int = PREFETCH):
    """The DALI pipeline graph; `device` is "gpu" or "cpu".

    feeder_workers > 0 runs the feeder in that many worker processes (DALI's parallel external source),
    each computing whole steps ahead; 0 runs it on the calling thread. Crops come out as [B, H, W, 3]
    (channels_last) or [B, 3, H, W], in `dtype` (one of CROP_DTYPES)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    interpolation = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
    mean = [255 * m for m in spec.mean]
    std = [255 * s for s in spec.std]
    on_gpu = device == "gpu"
    plan = feeder.plan
    luma_weights = [0.2989, 0.587, 0.114]  # torchvision's rgb_to_grayscale

    def whole(x):
        """uint8 semantics: clamp to [0, 255] and drop the fraction, as torchvision's uint8 ops do."""
        return dmath.floor(dmath.clamp(x, 0.0, 255.0))

    def gray(x):
        """torchvision's floored luma, [H, W, 1]."""
        return dmath.floor(fn.coord_transform(x, M=luma_weights))

    def per_sample(value):
        """Per-sample factors enter arithmetic on the device the images are on."""
        return value.gpu() if on_gpu else value

    def blend_op(op, x, factor):
        if op == BRIGHTNESS:
            return whole(x * factor)
        other = fn.reductions.mean(gray(x)) if op == CONTRAST else gray(x)  # SATURATION: the pixel's own grey
        return whole(x * factor + other * (1.0 - factor))

    def hue_shift(x, shift):
        """torchvision's adjust_hue: RGB -> HSV, rotate H by `shift` turns, HSV -> RGB (its formulas, written
        for DALI's arithmetic ops; DALI's own fn.hue rotates in YIQ space, ~10 grey levels away)."""
        x = x * (1.0 / 255.0)
        r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
        v = fn.reductions.max(x, axes=[2], keep_dims=True)
        spread = v - fn.reductions.min(x, axes=[2], keep_dims=True)
        flat = spread == 0.0
        saturation = spread / dmath.max(v, flat)  # torchvision: spread / (1 if flat else v)
        divisor = spread + flat
        not_r = v != r
        hue6 = ((g - b) * (v == r) + ((b - r) + 2.0 * divisor) * ((v == g) & not_r)
                + ((r - g) + 4.0 * divisor) * ((v != g) & not_r)) / divisor  # hue in sixths of a turn
        turns = hue6 * (1.0 / 6.0) + 1.0 + shift
        hue6 = (turns - dmath.floor(turns)) * 6.0
        # HSV -> RGB, channel c = v - v s w_c with w_c a clamped triangle of (hue6 + 5, 3, 1 mod 6): the same
        # values as torchvision's six-sector table, in a few ops on all three channels at once.
        k = hue6 + types.Constant(np.array([5.0, 3.0, 1.0], np.float32))
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        weight = dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)
        rgb = dmath.clamp(v - v * saturation * weight, 0.0, 1.0)
        return dmath.floor(rgb * 255.999)  # torchvision's float -> uint8 conversion

    def color_jitter(x, inputs):
        factors = [per_sample(inputs[name]) for name in JITTER_FACTORS]
        for where, j in plan.slots:
            if where == "post" and j == 0:
                x = hue_shift(x, factors[HUE])
            for op in plan.blend_ops:
                if inputs[f"{where}{j}_op{op}"]:
                    x = blend_op(op, x, factors[op])
        if plan.hue and not plan.blend_ops:
            x = hue_shift(x, factors[HUE])
        return x

    def crop_chain(image, group: CropGroup, inputs: dict):
        # Cut the window out first: resizing with a ROI would let the filters reach pixels outside it,
        # which torchvision's crop-then-resize never sees (visible when small windows are upscaled).
        window = fn.slice(image, inputs["top_left"], inputs["height_width"], axes=[0, 1],
                          normalized_anchor=False, normalized_shape=False)
        x = fn.resize(window, size=[group.size, group.size], interp_type=interpolation[group.interpolation],
                      antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if inputs["jitter"]:
            x = color_jitter(x, inputs)
        if inputs["grayscale"]:
            x = dmath.floor(fn.coord_transform(x, M=luma_weights * 3))
        if inputs["blur"]:
            x = dmath.floor(fn.gaussian_blur(x, sigma=inputs["sigma"], window_size=blur_taps(spec, group.size))
                            + 0.5)
        if inputs["solarize"]:
            x = x + (x >= float(SOLARIZE_THRESHOLD)) * (255.0 - 2.0 * x)
        # The flip commutes with every op before it (all are symmetric or per pixel), so it is done here.
        return fn.crop_mirror_normalize(x, mirror=fn.cast(inputs["flip"], dtype=types.INT32), dtype=out_dtype,
                                        output_layout="HWC" if channels_last else "CHW", mean=mean, std=std)

    def crop_inputs(crop_params, slot: int) -> dict:
        """The per-sample parameters of one crop slot, cut out of the feeder's packed array."""
        inputs = {name: crop_params[slot, i] for i, name in enumerate(feeder.columns())}
        inputs["top_left"], inputs["height_width"] = crop_params[slot, 0:2], crop_params[slot, 2:4]
        return inputs

    out_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
    parallel = dict(parallel=True, prefetch_queue_depth=max(prefetch, feeder_workers)) if feeder_workers else {}

    @pipeline_def(batch_size=feeder.local_batch, num_threads=max(1, num_threads), device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch, enable_conditionals=True,
                  py_num_workers=max(1, feeder_workers), py_start_method=worker_start_method())
    def multicrop():
        data, sample_ids, crop_params = fn.external_source(source=feeder, num_outputs=3, batch=True,
                                                           batch_info=True, **parallel)
        if feeder.encoded:
            image = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                      adjust_orientation=False, jpeg_fancy_upsampling=True)
        else:
            image = fn.reshape(data.gpu() if on_gpu else data, layout="HWC")
        crops = [crop_chain(image, group, crop_inputs(crop_params, slot)) for slot, group in enumerate(feeder.groups)]
        # Labels and indices go where the crops go; the replacement counts stay on the host, which reads them.
        return (*crops, sample_ids.gpu() if on_gpu else sample_ids, sample_ids)

    return multicrop()


def worker_start_method() -> str:
    """Forked workers start in milliseconds, but a process that has initialised CUDA must not fork:
    there the workers are spawned (they import the feeder's modules and unpickle it, seconds once)."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


class MultiCropPipeline:
    """Iterates Batches of this rank for steps start_step, start_step + 1, ... (num_steps of them).

    Crops come as `dtype` (float32 or float16) in `layout` (torch.channels_last: NHWC memory, the
    tensor still indexed [B, 3, H, W]), on the pipeline's device, without a copy out of DALI.
    """

    def __init__(self, source: ImageSource, data_cfg, *, seed: int, rank: int, world_size: int, start_step: int,
                 num_steps: int | None, device_id: int | None = None,
                 layout: torch.memory_format = torch.contiguous_format, dtype: torch.dtype = torch.float32):
        require_dali(data_cfg.device)
        if data_cfg.batch_size % world_size:
            raise ValueError(f"global batch {data_cfg.batch_size} does not split evenly over {world_size} ranks")
        if layout not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(f"crop layout {layout}; valid: torch.contiguous_format, torch.channels_last")
        if dtype not in CROP_DTYPES:
            raise ValueError(f"crop dtype {dtype}; DALI writes {', '.join(map(str, CROP_DTYPES))}")
        self.data_cfg, self.seed = data_cfg, seed
        self.channels_last, self.dtype = layout == torch.channels_last, dtype
        self.on_gpu = data_cfg.device == "gpu"
        self.device_id = (device_id if device_id is not None else torch.cuda.current_device()) if self.on_gpu else None
        self.feeder = StepFeeder(source, data_cfg.crops, data_cfg.augment, seed=seed, rank=rank,
                                 world_size=world_size, global_batch=data_cfg.batch_size, start_step=start_step)
        self.start_step, self.num_steps = start_step, num_steps
        self.step = start_step  # the step the next batch belongs to
        self.rebuilds = 0
        self.pipe = None

    def __len__(self):
        if self.num_steps is None:
            raise TypeError("an endless pipeline has no length")
        return self.num_steps

    def __iter__(self):
        return self

    def _build(self):
        # A failed DALI pipeline cannot run again; a fresh one (with fresh workers) starts at the step that failed.
        self.feeder.start_step = self.step
        self.pipe = build_pipeline(self.feeder, self.data_cfg.augment, device=self.data_cfg.device,
                                   device_id=self.device_id, num_threads=self.data_cfg.num_workers, seed=self.seed,
                                   feeder_workers=self.data_cfg.feeder_workers, channels_last=self.channels_last,
                                   dtype=self.dtype)
        # DALI starts the feeder workers here and offers no hook inside them: they inherit a mask that blocks
        # the stop signals (SIGINT and the configured ones included), so a scheduler's signal to every process
        # of the job leaves them running, and the trainer decides (data_pipelines/worker_signals.py).
        with worker_signals.blocked():
            self.pipe.build()

    def __next__(self) -> Batch:
        if self.num_steps is not None and self.step >= self.start_step + self.num_steps:
            raise StopIteration
        if self.pipe is None:
            self._build()
        try:
            # On the GPU the outputs are ordered on torch's current stream instead of waiting on the host.
            outputs = self.pipe.run(torch.cuda.current_stream(self.device_id) if self.on_gpu else None)
        except RuntimeError as error:
            self._recover(error)
            return next(self)
        self.step += 1
        return self._to_batch(outputs)

    def _recover(self, error: RuntimeError) -> None:
        """DALI failed on this step's batch: find the images that do not decode, and run the step again
        with them replaced. Only decode failures are recovered; anything else is raised."""
        self.pipe = None
        if not self.feeder.encoded or self.rebuilds >= MAX_PIPELINE_REBUILDS:
            raise error
        # The images fed for this step and the ones prefetched after it (the failure may be in either).
        suspects = set()
        for step in range(self.step, self.step + PREFETCH + 1):
            first = self.feeder.first_position(step)
            suspects |= {first_readable(self.feeder.read, len(self.feeder.source), self.feeder.stream.index(p))[1]
                         for p in range(first, first + self.feeder.local_batch)}
        bad = set()
        for index in sorted(suspects - self.feeder.known_bad):
            try:
                self.feeder.source.load(index)
            except UnreadableImage as unreadable:
                log.warning("skipping an image DALI could not decode: %s", unreadable)
                bad.add(index)
        if not bad:
            raise error
        self.feeder.known_bad |= bad
        self.rebuilds += 1

    def _to_batch(self, outputs) -> Batch:
        *crops, sample_ids, host_sample_ids = outputs
        crops = [as_torch(crop) for crop in crops]
        if self.channels_last:
            crops = [crop.permute(0, 3, 1, 2) for crop in crops]  # [B, H, W, 3] memory seen as [B, 3, H, W]
        sample_ids = as_torch(sample_ids)
        return Batch(crops, sample_ids[:, 0], sample_ids[:, 1], int(as_torch(host_sample_ids)[:, 2].sum()))


def as_torch(tensor_list) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on the same device, sharing DALI's memory (DLPack).

    DALI's default executor allocates every iteration's outputs afresh and frees them when the last
    reference goes, so the tensor stays valid however long it is kept. For a GPU tensor, torch hands
    its current stream to DALI, which makes that stream wait for the pipeline's work: no host sync."""
    return torch.from_dlpack(tensor_list.as_tensor())
