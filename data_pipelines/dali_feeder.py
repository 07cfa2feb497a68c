"""What the Python side hands the DALI pipeline for one step: the encoded images (or pixels) of this
rank's samples, their ids, and every crop's random parameters packed into one array.

This runs in DALI's worker processes (parallel external source) ahead of the step that needs it, so
the training thread only receives the result. It depends on nothing but the step number: the
workers may compute steps in any order and the crops stay the same as on the training thread.

Unreadable images: files are read and their headers checked here, before DALI sees them, and one
that fails is replaced by the next image (sources.first_readable), as the torchvision backend does.
JPEG and PNG sizes come from image_header (no Pillow); Pillow opens everything else, and converts
what DALI's decoders do not read. What DALI still fails to decode is found by the pipeline after the
fact and handed back through `known_bad` (see dali.MultiCropPipeline).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data_pipelines import params as draws
from data_pipelines.augment import AugmentSpec, CropGroup
from data_pipelines.image_header import encoded_size
from data_pipelines.params import HUE, jitter_ranges
from data_pipelines.sources import ImageSource, SampleStream, UnreadableImage, check_pixels, first_readable

# Formats DALI's decoders read; anything else Pillow can open is converted to BMP (cheap, lossless).
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}


@dataclass
class ReadImage:
    """What the Python side hands DALI for one sample."""

    payload: np.ndarray  # encoded file bytes (uint8 [n]) or decoded pixels (uint8 [H, W, 3])
    height: int
    width: int


def read_encoded(path: str, max_pixels: int | None = None) -> ReadImage:
    """The file's bytes and size, after the checks that catch what would stop a DALI decoder:
    not an image, an empty or truncated JPEG / PNG. Formats DALI cannot decode go through Pillow."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        header = encoded_size(data)
        if header is not None:
            kind, height, width = header
            if Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{height * width} pixels, as Pillow refuses them")
            check_pixels(path, height, width, max_pixels)
        else:
            with Image.open(io.BytesIO(data)) as image:
                (width, height), kind = image.size, image.format
                check_pixels(path, height, width, max_pixels)  # before the conversion below decodes it
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
    """In-memory sources (Fashion-MNIST, digits, synthetic) skip the decoder: their pixels go in as HWC."""
    pixels = np.ascontiguousarray(source.load(index).permute(1, 2, 0).numpy())
    return ReadImage(pixels, pixels.shape[0], pixels.shape[1])


class JitterPlan:
    """Turns each sample's random order of the colour jitters into a graph without four copies of each op.

    Hue, by far the most expensive op, runs once per crop: the brightness, contrast and saturation
    jitters that come before it in a sample's order run in the `pre` slots, those after it in the
    `post` slots. Each slot holds one conditional per op, and the feeder decides which (if any) applies.
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

    def steps(self, order: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        """[n, len(input_names)] bool: does the sample apply that op in that slot? A sample's blend ops
        before hue in its order fill its pre slots from the first on, those after hue its post slots."""
        n, width = order.shape
        if not self.blend_ops:
            return np.zeros((n, 0), bool)
        is_blend = np.isin(order, self.blend_ops) & jitter[:, None]
        hue_at = (order == HUE).argmax(axis=1) if self.hue else np.full(n, width)
        columns = np.arange(width)
        op_in_slot = {}
        for where, mask in (("pre", is_blend & (columns < hue_at[:, None])),
                            ("post", is_blend & (columns > hue_at[:, None]))):
            slot = np.cumsum(mask, axis=1) - 1  # the k-th selected op of a sample goes to slot k
            table = np.full((n, len(self.blend_ops)), -1)
            rows, cols = np.nonzero(mask)
            table[rows, slot[rows, cols]] = order[rows, cols]
            op_in_slot[where] = table
        return np.stack([op_in_slot[where][:, j] == op for where, j in self.slots for op in self.blend_ops], 1)


# The parameters of one crop, as columns of the feeder's packed array (the jitter plan's follow).
CROP_COLUMNS = ["top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation",
                "hue", "grayscale", "blur", "sigma", "solarize"]


class StepFeeder:
    """DALI's external source: everything one step of this rank needs.

    Called by DALI with the pipeline iteration (ahead of time, for prefetching; in worker processes when
    there are any); iteration i is step start_step + i of the global stream. Returns three outputs:
    the images (list of uint8 arrays), `sample_ids` int64 [B, 3] (label, index read, replacements) and
    `crop_params` float32 [B, crop slots, columns] (`columns()`; every value is a whole number or a
    float32 draw, so float32 holds it exactly).
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
        self.owner_pid = os.getpid()

    def columns(self) -> list[str]:
        return CROP_COLUMNS + self.plan.input_names()

    def first_position(self, step: int) -> int:
        return step * self.global_batch + self.offset

    def read(self, index: int) -> ReadImage:
        if index in self.known_bad:
            raise UnreadableImage(f"image {index} failed to decode earlier")
        if not self.encoded:
            return read_decoded(self.source, index)
        return read_encoded(self.source.path(index), getattr(self.source, "max_pixels", None))

    def __call__(self, info):
        if os.getpid() != self.owner_pid and torch.get_num_threads() > 1:
            torch.set_num_threads(1)  # a worker process: one thread each, as DataLoader workers do
        first = self.first_position(self.start_step + info.iteration)
        samples = [first_readable(self.read, len(self.source), self.stream.index(p))
                   for p in range(first, first + self.local_batch)]
        images = [image for image, _, _ in samples]
        indices = np.array([index for _, index, _ in samples], np.int64)
        replaced = np.array([count for _, _, count in samples], np.int64)
        sample_ids = np.stack([self.source.labels.numpy()[indices], indices, replaced], 1)
        heights = np.array([image.height for image in images])
        widths = np.array([image.width for image in images])
        slots = draws.draw(self.crops, self.spec, self.seed, first, self.local_batch)
        crop_params = np.empty((self.local_batch, len(slots), len(self.columns())), np.float32)
        for slot, (params, group) in enumerate(zip(slots, self.groups)):
            crop_params[:, slot] = np.concatenate([
                params.window(heights, widths, group),
                np.stack([params.flip, params.jitter], 1), params.factors,
                np.stack([params.grayscale, params.blur, params.sigma, params.solarize], 1),
                self.plan.steps(params.order, params.jitter)], axis=1)
        return [image.payload for image in images], sample_ids, crop_params
