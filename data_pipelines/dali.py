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
values and clamps to [0, 255], contrast blends towards the mean of the floored grayscale, blur
rounds). One op differs: DALI's hue rotation works in YIQ space, torchvision's in HSV; the
rotation angle is the same (360 x hue factor degrees).
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
from data_pipelines.params import BRIGHTNESS, CONTRAST, SATURATION, jitter_ranges
from data_pipelines.sources import FileSource, ImageSource, SampleStream, Subset, UnreadableImage, first_readable

log = logging.getLogger(__name__)

# Formats DALI's decoders read; anything else Pillow can open is converted to BMP (cheap, lossless).
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
# Pipeline rebuilds after decode failures that the header checks did not catch, before giving up.
MAX_PIPELINE_REBUILDS = 16


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


def file_of(source: ImageSource, index: int) -> str | None:
    """The path of image `index` if the source reads files, else None."""
    if isinstance(source, Subset):
        return file_of(source.source, int(source.indices[index]))
    if isinstance(source, FileSource):
        return source.paths[index]
    return None


def reads_files(source: ImageSource) -> bool:
    return file_of(source, 0) is not None


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
        self.encoded = reads_files(source)
        self.known_bad: set[int] = set()  # images DALI failed to decode (found by MultiCropPipeline)
        self.groups = [group for group in crops for _ in range(group.count)]

    def first_position(self, step: int) -> int:
        return step * self.global_batch + self.offset

    def read(self, index: int) -> ReadImage:
        if index in self.known_bad:
            raise UnreadableImage(f"image {index} failed to decode earlier")
        return read_encoded(file_of(self.source, index)) if self.encoded else read_decoded(self.source, index)

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
                        params.flip.astype(np.int32), params.jitter, params.factors, params.order,
                        params.grayscale, params.blur, params.sigma, params.solarize]
        return tuple(outputs)


PER_CROP_INPUTS = 10  # roi_start, roi_end, flip, jitter, factors, order, grayscale, blur, sigma, solarize
META_INPUTS = 4       # images, labels, indices, replacements


def build_pipeline(feeder: StepFeeder, spec: AugmentSpec, *, device: str, device_id: int | None,
                   num_threads: int, seed: int, prefetch: int = 2):
    """The DALI pipeline graph; `device` is "gpu" or "cpu"."""
    from nvidia.dali import fn, pipeline_def, types

    import nvidia.dali.math as dmath

    interpolation = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
    enabled_ops = [op for op, bounds in enumerate(jitter_ranges(spec)) if bounds is not None]
    blur_window = blur_kernel_size(spec.blur_sigma[1])
    mean = [255 * m for m in spec.mean]
    std = [255 * s for s in spec.std]
    on_gpu = device == "gpu"

    def whole(x):
        """uint8 semantics: clamp to [0, 255] and drop the fraction, as torchvision's uint8 ops do."""
        return dmath.floor(dmath.clamp(x, 0.0, 255.0))

    def gray(x):
        """torchvision's floored luma, [H, W, 1]."""
        luma = dmath.floor(x[:, :, 0] * 0.2989 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114)
        return fn.expand_dims(luma, axes=[2], new_axis_names="C")

    def blend(x, other, factor):
        return whole(x * factor + other * (1.0 - factor))

    def per_sample(value):
        """Per-sample factors enter arithmetic on the device the images are on."""
        return value.gpu() if on_gpu else value

    def jitter_op(op, x, factors):
        factor = factors[op]
        if op == BRIGHTNESS:
            return whole(x * per_sample(factor))
        if op == CONTRAST:
            return blend(x, fn.reductions.mean(gray(x)), per_sample(factor))
        if op == SATURATION:
            return blend(x, gray(x), per_sample(factor))
        return hue_shift(x, per_sample(factor))

    def hue_shift(x, shift):
        """torchvision's adjust_hue: RGB -> HSV, rotate H by `shift` turns, HSV -> RGB (its formulas, in
        DALI arithmetic; DALI's own fn.hue rotates in YIQ space, which moves pixels by ~10 levels more)."""
        r, g, b = x[:, :, 0] / 255.0, x[:, :, 1] / 255.0, x[:, :, 2] / 255.0
        v = dmath.max(dmath.max(r, g), b)
        low = dmath.min(dmath.min(r, g), b)
        flat = v == low
        spread = v - low
        s = spread / (v + flat * (1.0 - v))
        divisor = spread + flat * 1.0
        rc, gc, bc = (v - r) / divisor, (v - g) / divisor, (v - b) / divisor
        r_max, g_max, not_r = v == r, v == g, v != r
        h = (bc - gc) * r_max + (2.0 + rc - bc) * (g_max & not_r) + (4.0 + gc - rc) * (not_r & (v != g))
        h = h / 6.0 + 1.0
        h = h - dmath.floor(h) + shift
        h6 = (h - dmath.floor(h)) * 6.0
        sector = dmath.floor(h6)
        f = h6 - sector
        sector = sector - 6.0 * dmath.floor(sector / 6.0)
        p = dmath.clamp(v * (1.0 - s), 0.0, 1.0)
        q = dmath.clamp(v * (1.0 - s * f), 0.0, 1.0)
        t = dmath.clamp(v * (1.0 - s + s * f), 0.0, 1.0)
        m = [sector == float(k) for k in range(6)]
        red = v * (m[0] | m[5]) + q * m[1] + p * (m[2] | m[3]) + t * m[4]
        green = t * m[0] + v * (m[1] | m[2]) + q * m[3] + p * (m[4] | m[5])
        blue = p * (m[0] | m[1]) + t * m[2] + v * (m[3] | m[4]) + q * m[5]
        channels = [fn.expand_dims(dmath.floor(c * 255.999), axes=[2], new_axis_names="C") for c in (red, green, blue)]
        return fn.cat(*channels, axis=2)

    def crop_chain(image, group: CropGroup, roi_start, roi_end, flip, jitter, factors, order, grayscale, blur,
                   sigma, solarize):
        # Cut the window out first: resizing with a ROI would let the filters reach pixels outside it,
        # which torchvision's crop-then-resize never sees (visible when small windows are upscaled).
        window = fn.slice(image, roi_start, roi_end - roi_start, axes=[0, 1], normalized_anchor=False,
                          normalized_shape=False)
        x = fn.resize(window, size=[group.size, group.size], interp_type=interpolation[group.interpolation],
                      antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if jitter:
            for slot in range(4):
                for op in enabled_ops:
                    if order[slot] == op:
                        x = jitter_op(op, x, factors)
        if grayscale:
            luma = gray(x)
            x = fn.cat(luma, luma, luma, axis=2)
        if blur:
            x = dmath.floor(fn.gaussian_blur(x, sigma=sigma, window_size=blur_window) + 0.5)
        if solarize:
            x = x + (x >= float(SOLARIZE_THRESHOLD)) * (255.0 - 2.0 * x)
        # The flip commutes with every op before it (all are symmetric or per pixel), so it is done here.
        return fn.crop_mirror_normalize(x, mirror=flip, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)

    n_outputs = META_INPUTS + PER_CROP_INPUTS * len(feeder.groups)

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
            first = META_INPUTS + slot * PER_CROP_INPUTS
            crops.append(crop_chain(image, group, *inputs[first:first + PER_CROP_INPUTS]))
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
        first = self.feeder.first_position(self.step)
        suspects = {self.feeder.stream.index(p) for p in range(first, first + self.feeder.local_batch)}
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
