"""NVIDIA DALI backend: decode each image once, then one independent augmentation chain per crop.

On a GPU the decode is "mixed" (nvJPEG and the hardware JPEG decoder) and every op runs on the
GPU; on a CPU the same graph runs on DALI's CPU backend (`device_id=None`), which is what CI tests.

What stays in Python, and why:
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
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data_pipelines import params as draws
from data_pipelines.augment import SOLARIZE_THRESHOLD, AugmentSpec, CropGroup, blur_kernel_size
from data_pipelines.batch import Batch
from data_pipelines.params import BRIGHTNESS, CONTRAST, HUE, jitter_ranges
from data_pipelines.sources import ImageSource, SampleStream, UnreadableImage, first_readable

log = logging.getLogger(__name__)

# Formats DALI's decoders read; anything else Pillow can open is converted to BMP (cheap, lossless).
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
# Pipeline rebuilds after decode failures that the header checks did not catch, before giving up.
MAX_PIPELINE_REBUILDS = 16
PREFETCH = 2  # batches DALI prepares ahead


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


@dataclass
class ReadImage:
    """What the Python side hands DALI for one sample."""

    payload: np.ndarray  # encoded file bytes (uint8 [n]) or decoded pixels (uint8 [H, W, 3])
    height: int
    width: int


def read_encoded(path: str) -> ReadImage:
    """The file's bytes and size, after the checks that catch what would stop a DALI decoder:
    not an image, an empty or truncated JPEG / PNG. Formats DALI cannot decode go through Pillow."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            kind = image.format
            if kind not in DALI_FORMATS:
                converted = io.BytesIO()
                image.convert("RGB").save(converted, "BMP")
                data = converted.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{path}: {error}") from error
    if kind == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise UnreadableImage(f"{path}: truncated JPEG (no end-of-image marker)")
    if kind == "PNG" and b"IEND" not in data[-64:]:
        raise UnreadableImage(f"{path}: truncated PNG (no IEND chunk)")
    return ReadImage(np.frombuffer(data, np.uint8), height, width)


def read_decoded(source: ImageSource, index: int) -> ReadImage:
    """In-memory sources (Fashion-MNIST, digits) skip the decoder: their pixels go in as HWC."""
    pixels = np.ascontiguousarray(source.load(index).permute(1, 2, 0).numpy())
    return ReadImage(pixels, pixels.shape[0], pixels.shape[1])


class StepFeeder:
    """DALI's external source: everything one step of this rank needs, as per-sample batches.

    Called by DALI with the pipeline iteration (ahead of time, for prefetching); iteration i is
    step start_step + i of the global stream.
    """

    def __init__(self, source: ImageSource, crops: list[CropGroup], spec: AugmentSpec, *, seed: int,
                 rank: int, world_size: int, global_batch: int, start_step: int):
        self.source, self.crops, self.spec, self.seed = source, crops, spec, seed
        self.stream = SampleStream(len(source), seed)
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.global_batch, self.start_step = global_batch, start_step
        self.encoded = source.path(0) is not None  # files: DALI decodes them; else raw pixels
        self.known_bad: set[int] = set()  # images DALI failed to decode (found by MultiCropPipeline)
        self.groups = [group for group in crops for _ in range(group.count)]
        self.plan = JitterPlan(spec)

    def first_position(self, step: int) -> int:
        return step * self.global_batch + self.offset

    def read(self, index: int) -> ReadImage:
        if index in self.known_bad:
            raise UnreadableImage(f"image {index} failed to decode earlier")
        return read_encoded(self.source.path(index)) if self.encoded else read_decoded(self.source, index)

    def __call__(self, info):
        first = self.first_position(self.start_step + info.iteration)
        positions = range(first, first + self.local_batch)
        samples = [first_readable(self.read, len(self.source), self.stream.index(p)) for p in positions]
        images = [image for image, _, _ in samples]
        indices = np.array([index for _, index, _ in samples], np.int64)
        replaced = np.array([count for _, _, count in samples], np.int32)
        heights = np.array([image.height for image in images])
        widths = np.array([image.width for image in images])
        outputs = [[image.payload for image in images], self.source.labels[indices].numpy(), indices, replaced]
        for params, group in zip(draws.draw(self.crops, self.spec, self.seed, first, self.local_batch), self.groups):
            top, left, height, width = params.window(heights, widths, group).T.astype(np.float32)
            outputs += [np.stack([top, left], 1), np.stack([top + height, left + width], 1),
                        params.flip.astype(np.int32), params.jitter, params.factors,
                        params.grayscale, params.blur, params.sigma, params.solarize]
            outputs += list(self.plan.steps(params.order, params.jitter))
        return tuple(outputs)


class JitterPlan:
    """Turns each sample's random order of the colour jitters into a graph without four copies of each op.

    Hue, by far the most expensive op, runs once per crop: the brightness, contrast and saturation
    jitters that come before it in a sample's order run in the `pre` slots, those after it in the
    `post` slots. Each slot holds one conditional per op, and Python decides which (if any) applies.
    """

    def __init__(self, spec: AugmentSpec):
        enabled = [op for op, bounds in enumerate(jitter_ranges(spec)) if bounds is not None]
        self.blend_ops = [op for op in enabled if op != HUE]   # brightness, contrast, saturation
        self.hue = HUE in enabled
        self.slots = [("pre", j) for j in range(len(self.blend_ops))]
        if self.hue:
            self.slots += [("post", j) for j in range(len(self.blend_ops))]

    def input_names(self) -> list[str]:
        return [f"{where}{j}_op{op}" for where, j in self.slots for op in self.blend_ops]

    def steps(self, order: np.ndarray, jitter: np.ndarray):
        """For every (slot, op) of input_names: does the sample apply that op in that slot?"""
        pre = np.full((len(order), len(self.blend_ops)), -1)
        post = np.full_like(pre, -1)
        for i, sample_order in enumerate(order):
            if not jitter[i]:
                continue
            split = list(sample_order).index(HUE) if self.hue else len(sample_order)
            before = [op for op in sample_order[:split] if op in self.blend_ops]
            after = [op for op in sample_order[split + 1:] if op in self.blend_ops]
            pre[i, :len(before)], post[i, :len(after)] = before, after
        for where, j in self.slots:
            table = pre if where == "pre" else post
            for op in self.blend_ops:
                yield table[:, j] == op


CROP_INPUTS = ["roi_start", "roi_end", "flip", "jitter", "factors", "grayscale", "blur", "sigma", "solarize"]
META_INPUTS = 4  # images, labels, indices, replacements


def build_pipeline(feeder: StepFeeder, spec: AugmentSpec, *, device: str, device_id: int | None,
                   num_threads: int, seed: int, prefetch: int = PREFETCH):
    """The DALI pipeline graph; `device` is "gpu" or "cpu"."""
    from nvidia.dali import fn, pipeline_def, types

    import nvidia.dali.math as dmath

    interpolation = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
    blur_window = blur_kernel_size(spec.blur_sigma[1])
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
        factors = per_sample(inputs["factors"])
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
        window = fn.slice(image, inputs["roi_start"], inputs["roi_end"] - inputs["roi_start"], axes=[0, 1],
                          normalized_anchor=False, normalized_shape=False)
        x = fn.resize(window, size=[group.size, group.size], interp_type=interpolation[group.interpolation],
                      antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if inputs["jitter"]:
            x = color_jitter(x, inputs)
        if inputs["grayscale"]:
            x = dmath.floor(fn.coord_transform(x, M=luma_weights * 3))
        if inputs["blur"]:
            x = dmath.floor(fn.gaussian_blur(x, sigma=inputs["sigma"], window_size=blur_window) + 0.5)
        if inputs["solarize"]:
            x = x + (x >= float(SOLARIZE_THRESHOLD)) * (255.0 - 2.0 * x)
        # The flip commutes with every op before it (all are symmetric or per pixel), so it is done here.
        return fn.crop_mirror_normalize(x, mirror=inputs["flip"], dtype=types.FLOAT, output_layout="CHW",
                                        mean=mean, std=std)

    names = CROP_INPUTS + plan.input_names()
    n_outputs = META_INPUTS + len(names) * len(feeder.groups)

    @pipeline_def(batch_size=feeder.local_batch, num_threads=max(1, num_threads), device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch, enable_conditionals=True)
    def multicrop():
        inputs = fn.external_source(source=feeder, num_outputs=n_outputs, batch=True, batch_info=True)
        data, labels, indices, replaced = inputs[:META_INPUTS]
        if feeder.encoded:
            image = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                      adjust_orientation=False, jpeg_fancy_upsampling=True)
        else:
            image = fn.reshape(data.gpu() if on_gpu else data, layout="HWC")
        crops = []
        for slot, group in enumerate(feeder.groups):
            first = META_INPUTS + slot * len(names)
            crops.append(crop_chain(image, group, dict(zip(names, inputs[first:first + len(names)]))))
        return (*crops, labels, indices, replaced)

    return multicrop()


class MultiCropPipeline:
    """Iterates Batches of this rank for steps start_step, start_step + 1, ... (num_steps of them)."""

    def __init__(self, source: ImageSource, data_cfg, *, seed: int, rank: int, world_size: int, start_step: int,
                 num_steps: int | None, device_id: int | None = None):
        require_dali(data_cfg.device)
        if data_cfg.batch_size % world_size:
            raise ValueError(f"global batch {data_cfg.batch_size} does not split evenly over {world_size} ranks")
        self.data_cfg, self.seed = data_cfg, seed
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
        # A failed DALI pipeline cannot run again; a fresh one starts at the step that failed.
        self.feeder.start_step = self.step
        self.pipe = build_pipeline(self.feeder, self.data_cfg.augment, device=self.data_cfg.device,
                                   device_id=self.device_id, num_threads=self.data_cfg.num_workers, seed=self.seed)
        self.pipe.build()

    def __next__(self) -> Batch:
        if self.num_steps is not None and self.step >= self.start_step + self.num_steps:
            raise StopIteration
        if self.pipe is None:
            self._build()
        try:
            outputs = self.pipe.run()
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
        *crops, labels, indices, replaced = outputs
        return Batch([to_torch(crop) for crop in crops], to_torch(labels), to_torch(indices),
                     int(to_torch(replaced).sum()))


def to_torch(tensor_list) -> torch.Tensor:
    """A copy of a dense DALI batch as a torch tensor on the same device."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    on_gpu = type(dense).__name__ == "TensorGPU"
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype],
                      device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    stream = torch.cuda.current_stream() if on_gpu else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out
