"""The DALI backend (its CPU backend here; the same graph runs on a GPU) against the torchvision backend.

Both backends take every random number from params.py, so on the same seed they must produce the same
crops, up to decoder and resampling rounding: that is checked pixel by pixel, op by op. A separate
test checks that the per-op statistics of both agree with torchvision's own v2 transforms (drawing
their own random numbers) within sampling error.
"""
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

from data_pipelines.dali import BackendUnavailable, MultiCropPipeline, require_dali  # noqa: E402
from data_pipelines.preview import HEADER, MIN_CELL, PAD  # noqa: E402
from data_pipelines.sources import ArraySource, image_folder  # noqa: E402
from data_pipelines.torchvision import multicrop_loader  # noqa: E402
from sslscale.config import ConfigError, load_config  # noqa: E402
from tests.conftest import REPO  # noqa: E402

STD_PIXELS = 0.226 * 255  # about one normalised unit in grey levels (ImageNet std)
NO_OPS = ["data.augment.jitter.p=0", "data.augment.grayscale_p=0", "data.augment.blur_p=0",
          "data.augment.solarize_p=0", "data.augment.flip_p=0"]


def photos():
    from sklearn.datasets import load_sample_images
    return load_sample_images().images  # two colour photos, 427 x 640


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """40 JPEGs of different sizes (60 to 300 px) cut from two colour photos, in two classes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(40):
        photo = photos()[i % 2]
        top, left = int(rng.integers(0, 200)), int(rng.integers(0, 300))
        image = Image.fromarray(photo[top:top + 220, left:left + 330])
        image = image.resize((int(rng.integers(60, 300)), int(rng.integers(60, 300))), Image.BILINEAR)
        os.makedirs(root / "train" / f"c{i % 2}", exist_ok=True)
        image.save(root / "train" / f"c{i % 2}" / f"{i:03d}.jpg", quality=92)
    return root


def data_config(*overrides):
    return load_config(None, ["data.source=digits", "data.num_workers=2", *overrides]).data


def both_backends(source, data_cfg, *, steps, seed=1, start_step=0, rank=0, world_size=1):
    kwargs = dict(seed=seed, rank=rank, world_size=world_size, start_step=start_step, num_steps=steps)
    return (list(multicrop_loader(source, data_cfg, **kwargs)), list(MultiCropPipeline(source, data_cfg, **kwargs)))


ONE_OP = {  # each op alone, applied to every crop
    "crop and flip": ["data.augment.flip_p=0.5"],
    "brightness": ["data.augment.jitter.p=1", "data.augment.jitter.contrast=0", "data.augment.jitter.saturation=0",
                   "data.augment.jitter.hue=0"],
    "contrast": ["data.augment.jitter.p=1", "data.augment.jitter.brightness=0", "data.augment.jitter.saturation=0",
                 "data.augment.jitter.hue=0"],
    "saturation": ["data.augment.jitter.p=1", "data.augment.jitter.brightness=0", "data.augment.jitter.contrast=0",
                   "data.augment.jitter.hue=0"],
    "hue": ["data.augment.jitter.p=1", "data.augment.jitter.brightness=0", "data.augment.jitter.contrast=0",
            "data.augment.jitter.saturation=0", "data.augment.jitter.hue=0.5"],
    "grayscale": ["data.augment.grayscale_p=1"],
    "blur": ["data.augment.blur_p=1", "data.augment.blur_sigma=[0.5, 2.0]"],
    "solarize": ["data.augment.solarize_p=1"],
    "everything": ["data.augment.flip_p=0.5", "data.augment.jitter.p=0.8", "data.augment.grayscale_p=0.2",
                   "data.augment.blur_p=0.5", "data.augment.solarize_p=0.2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("op", list(ONE_OP))
def test_dali_crops_equal_torchvision_crops_to_a_fraction_of_a_grey_level(photo_folder, op):
    data_cfg = data_config("data.source=folder", f"data.path={photo_folder}", "data.batch_size=10",
                           "data.crops=[{size: 48, count: 2}, {size: 24, count: 2, scale: [0.05, 0.3], "
                           "interpolation: bicubic}]", *NO_OPS, *ONE_OP[op])
    source = image_folder(str(photo_folder / "train"))
    torchvision_batches, dali_batches = both_backends(source, data_cfg, steps=2)
    assert len(dali_batches) == 2
    for tv, dali in zip(torchvision_batches, dali_batches):
        assert torch.equal(tv.index, dali.index) and torch.equal(tv.labels, dali.labels)
        assert tv.n_unreadable == dali.n_unreadable == 0
        for a, b in zip(tv.crops, dali.crops):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32 and b.is_contiguous()
            difference = (a - b).abs() * STD_PIXELS  # in grey levels
            # Decoders (Pillow vs libjpeg-turbo in DALI) and resamplers round differently: a few tenths of a
            # grey level on average. A wrong op (DALI's YIQ hue, a contrast centred on 128, a missing flip)
            # moves whole crops by several levels.
            assert difference.mean() < 0.5, f"{op}: mean difference {difference.mean():.2f} grey levels"
            assert difference.flatten(1).mean(1).max() < 1.5, f"{op}: a crop differs by " \
                f"{difference.flatten(1).mean(1).max():.2f} grey levels on average"


# ---------------------------------------------------------------------------------------------
# Per-op statistics against torchvision's own transforms


def reference_crops(image: torch.Tensor, group, spec, count: int, seed: int) -> torch.Tensor:
    """torchvision v2's own transforms with their own random numbers: the semantics both backends follow."""
    from torchvision.transforms import InterpolationMode, v2

    from data_pipelines.augment import blur_kernel_size
    j = spec.jitter
    ops = [v2.RandomResizedCrop(group.size, scale=tuple(group.scale), ratio=tuple(group.ratio),
                                interpolation=InterpolationMode.BILINEAR, antialias=True),
           v2.RandomHorizontalFlip(spec.flip_p),
           v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p),
           v2.RandomGrayscale(spec.grayscale_p)]
    if spec.blur_p > 0:
        kernel = blur_kernel_size(spec.blur_sigma[1])
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(spec.blur_sigma))], p=spec.blur_p))
    transform = v2.Compose(ops)
    torch.manual_seed(seed)
    return torch.stack([transform(image) for _ in range(count)]).float()


def backend_crops(backend: str, image: torch.Tensor, data_cfg, count: int, seed: int) -> torch.Tensor:
    """The same image `count` times through a backend, as grey levels (un-normalised)."""
    source = ArraySource(np.repeat(image.permute(1, 2, 0).numpy()[None], data_cfg.batch_size, 0),
                         np.zeros(data_cfg.batch_size, np.int64), ["only"])
    crops_per_image = sum(g.count for g in data_cfg.crops)
    steps = count // (data_cfg.batch_size * crops_per_image)
    kwargs = dict(seed=seed, rank=0, world_size=1, start_step=0, num_steps=steps)
    batches = (MultiCropPipeline(source, data_cfg, **kwargs) if backend == "dali"
               else multicrop_loader(source, data_cfg, **kwargs))
    crops = torch.cat([crop for b in batches for crop in b.crops])
    mean = torch.tensor(data_cfg.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg.augment.std).view(1, 3, 1, 1)
    return (crops * std + mean) * 255


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def assert_same_distribution(name, reference: np.ndarray, ours: np.ndarray):
    """Two-sample Kolmogorov-Smirnov at the 0.1% level: the critical distance is 1.95 sqrt(2/n)."""
    critical = 1.95 * np.sqrt(2 / len(reference))
    distance = ks_distance(reference, ours)
    assert distance < critical, f"{name}: KS distance {distance:.3f} >= {critical:.3f} (n = {len(reference)})"


def assert_same_rate(name, reference: np.ndarray, ours: np.ndarray):
    """Two proportions agree within 4 standard errors."""
    p = (reference.mean() + ours.mean()) / 2
    standard_error = np.sqrt(max(p * (1 - p), 1e-12) * 2 / len(reference))
    assert abs(reference.mean() - ours.mean()) < 4 * standard_error, \
        f"{name}: rate {ours.mean():.3f} vs torchvision's {reference.mean():.3f}"


def coordinate_image(size: int = 128) -> torch.Tensor:
    """Red = 2 x column, green = 2 x row: a crop's pixel values tell where it came from."""
    ramp = torch.arange(size, dtype=torch.uint8) * 2
    return torch.stack([ramp.expand(size, size), ramp.view(-1, 1).expand(size, size),
                        torch.zeros(size, size, dtype=torch.uint8)])


def window_statistics(crops: torch.Tensor, image_size: int) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and flip of each crop of the coordinate image, read from the
    slopes of its red and green ramps between a quarter and three quarters of the crop."""
    size = crops.shape[-1]
    lo, hi = size // 4, 3 * size // 4
    red, green = crops[:, 0, size // 2], crops[:, 1, :, size // 2]
    width = (red[:, hi] - red[:, lo]) / 2 / (hi - lo) * size
    height = (green[:, hi] - green[:, lo]) / 2 / (hi - lo) * size
    return {"area": (width.abs() * height / image_size ** 2).numpy(),
            "log aspect": torch.log(width.abs() / height).numpy(), "flip": (width < 0).numpy()}


def chroma(crops: torch.Tensor) -> np.ndarray:
    return (crops.amax(1) - crops.amin(1)).flatten(1).mean(1).numpy()


COUNT = 480  # crops per backend and statistic


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_per_op_statistics_match_torchvisions_own_transforms(backend):
    group_overrides = "data.crops=[{size: 32, count: 2, scale: [0.08, 1.0], ratio: [0.75, 1.3333]}]"
    base = ["data.batch_size=80", group_overrides, *NO_OPS]

    def compare(image, overrides, measure):
        data_cfg = data_config(*base, *overrides)
        reference = reference_crops(image, data_cfg.crops[0], data_cfg.augment, COUNT, seed=11)
        ours = backend_crops(backend, image, data_cfg, COUNT, seed=12)
        return measure(reference), measure(ours)

    # Crop window (area, aspect) and flip rate, from the coordinate image.
    reference, ours = compare(coordinate_image(), ["data.augment.flip_p=0.5"],
                              lambda crops: window_statistics(crops, 128))
    assert_same_distribution("crop area", reference["area"], ours["area"])
    assert_same_distribution("crop log aspect", reference["log aspect"], ours["log aspect"])
    assert_same_rate("flip", reference["flip"], ours["flip"])
    assert 0.4 < ours["flip"].mean() < 0.6

    photo = torch.from_numpy(photos()[1][100:300, 200:400].copy()).permute(2, 0, 1)
    # Grayscale rate: crops whose three channels are equal (up to un-normalising).
    reference, ours = compare(photo, ["data.augment.grayscale_p=0.3"], lambda crops: chroma(crops) < 0.01)
    assert_same_rate("grayscale", reference, ours)
    assert 0.2 < ours.mean() < 0.4

    flat = torch.tensor([200, 120, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 64).contiguous()
    jitter_only = lambda kind: ["data.augment.jitter.p=1", *[f"data.augment.jitter.{k}=0" for k in  # noqa: E731
                                ("brightness", "contrast", "saturation", "hue") if k != kind]]
    # Brightness: the mean grey level of a flat colour scales with the factor.
    reference, ours = compare(flat, jitter_only("brightness"), lambda crops: crops.mean((1, 2, 3)).numpy())
    assert_same_distribution("brightness", reference, ours)
    # Saturation: the spread between channels of a flat colour scales with the factor.
    reference, ours = compare(flat, jitter_only("saturation"), chroma)
    assert_same_distribution("saturation", reference, ours)
    # Blur: how much of the photo's fine detail (neighbour differences) survives.
    detail = lambda crops: (crops[..., 1:] - crops[..., :-1]).abs().mean((1, 2, 3)).numpy()  # noqa: E731
    reference, ours = compare(photo, ["data.augment.blur_p=0.5", "data.augment.blur_sigma=[0.1, 2.0]",
                                      "data.crops=[{size: 32, count: 2, scale: [0.5, 1.0]}]"], detail)
    assert_same_distribution("blur", reference, ours)


# ---------------------------------------------------------------------------------------------
# Epochs, ranks, resume


def test_epoch_ends_ranks_and_resume_are_exact():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (45, 12, 12, 3), dtype=np.uint8)  # 45: not a multiple of the batch
    source = ArraySource(images, np.arange(45) % 3, ["a", "b", "c"])
    data_cfg = data_config("data.batch_size=8", "data.crops=[{size: 8, count: 2}]")
    steps = 12  # 96 samples: two epochs and a bit

    def run(rank=0, world_size=1, start_step=0, num_steps=steps):
        return list(MultiCropPipeline(source, data_cfg, seed=3, rank=rank, world_size=world_size,
                                      start_step=start_step, num_steps=num_steps))

    one_rank = run()
    order = torch.cat([b.index for b in one_rank]).tolist()
    assert sorted(order[:45]) == list(range(45)) and sorted(order[45:90]) == list(range(45))
    torchvision_order = torch.cat([b.index for b in multicrop_loader(
        source, data_cfg, seed=3, rank=0, world_size=1, start_step=0, num_steps=steps)]).tolist()
    assert order == torchvision_order

    ranks = [run(rank=r, world_size=2) for r in range(2)]
    for step, whole in enumerate(one_rank):
        halves = [ranks[r][step] for r in range(2)]
        assert all(h.index.shape == (4,) for h in halves)
        assert torch.equal(torch.cat([h.index for h in halves]), whole.index)
        for slot in range(2):
            assert torch.equal(torch.cat([h.crops[slot] for h in halves]), whole.crops[slot])

    resumed = run(start_step=7, num_steps=steps - 7)
    for a, b in zip(one_rank[7:], resumed):
        assert torch.equal(a.index, b.index)
        assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))


# ---------------------------------------------------------------------------------------------
# Bad input


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, fmt)
    return out.getvalue()


def write_bad_image_folder(root):
    """Eleven files: good ones, odd ones DALI reads after conversion, and four that cannot be read.
    Returns the source and the indices of the unreadable ones."""
    rng = np.random.default_rng(0)
    photo = photos()[0]
    good = jpeg_bytes(photo[:120, :160])
    start_of_scan = good.find(b"\xff\xda")
    files = {  # unreadable ones never follow each other, so each is met (and replaced) once per epoch
        "00_good.jpg": good,
        "01_truncated.jpg": good[: len(good) // 2],
        "02_gray.jpg": jpeg_bytes(photo[:50, :70], "L"),
        "03_text.jpg": b"this is not an image",
        "04_cmyk.jpg": jpeg_bytes(photo[:50, :70], "CMYK"),
        "05_empty.jpg": b"",
        "06_rgba.png": jpeg_bytes(photo[:40, :40], "RGBA", "PNG"),
        "07_tiny.jpg": jpeg_bytes(rng.integers(0, 255, (2, 3, 3), dtype=np.uint8)),
        "08_anim.gif": jpeg_bytes(photo[:40, :50], "P", "GIF"),
        # A complete-looking JPEG (header and end marker) without image data: only the decoder notices.
        "09_no_scan.jpg": good[:start_of_scan] + b"\xff\xd9",
        "10_good.jpg": jpeg_bytes(photo[200:300, 100:260]),
    }
    (root / "train" / "c").mkdir(parents=True)
    for name, data in files.items():
        (root / "train" / "c" / name).write_bytes(data)
    source = image_folder(str(root / "train"))
    names = [os.path.basename(p) for p in source.paths]
    return source, {names.index(n) for n in ("01_truncated.jpg", "03_text.jpg", "05_empty.jpg", "09_no_scan.jpg")}


def test_bad_images_are_skipped_and_counted_and_odd_ones_converted(tmp_path):
    source, unreadable = write_bad_image_folder(tmp_path)
    names = [os.path.basename(p) for p in source.paths]
    data_cfg = data_config("data.source=folder", f"data.path={tmp_path}", "data.batch_size=11",
                           "data.crops=[{size: 16, count: 2}]")
    torchvision_batches, dali_batches = both_backends(source, data_cfg, steps=2)
    for batches in (torchvision_batches, dali_batches):
        for batch in batches:
            assert batch.n_unreadable == 4, "every epoch meets the four unreadable images once"
            assert unreadable.isdisjoint(batch.index.tolist())
            assert {names.index(n) for n in ("02_gray.jpg", "04_cmyk.jpg", "06_rgba.png", "07_tiny.jpg",
                                              "08_anim.gif")} <= set(batch.index.tolist())
            assert all(torch.isfinite(c).all() for c in batch.crops)
    for tv, dali in zip(torchvision_batches, dali_batches):
        assert torch.equal(tv.index, dali.index)  # the same replacements
        for a, b in zip(tv.crops, dali.crops):
            assert ((a - b).abs() * STD_PIXELS).mean() < 1.0


@pytest.mark.slow
def test_feeder_workers_do_not_change_the_crops_and_replace_unreadable_images_alike(tmp_path, monkeypatch):
    """The feeder on the training thread, in two forked workers, and in a spawned one (how it starts in a
    process that has initialised CUDA): the same crops bit for bit, the same replacements and counts, also
    for the image only DALI's decoder finds unreadable (the pipeline is rebuilt with fresh workers)."""
    import data_pipelines.dali
    source, unreadable = write_bad_image_folder(tmp_path)
    data_cfg = data_config("data.source=folder", f"data.path={tmp_path}", "data.batch_size=11",
                           "data.crops=[{size: 16, count: 2}]", "data.augment.jitter.p=0.8")
    kwargs = dict(seed=1, rank=0, world_size=1, start_step=1, num_steps=2)
    runs = {}
    for workers, start in ((0, "fork"), (2, "fork"), (1, "spawn")):
        monkeypatch.setattr(data_pipelines.dali, "worker_start_method", lambda: start)  # noqa: B023
        data_cfg.feeder_workers = workers
        pipeline = MultiCropPipeline(source, data_cfg, **kwargs)
        runs[workers, start] = list(pipeline)
        assert pipeline.rebuilds == 1  # 09_no_scan.jpg, found by DALI's decoder
    reference = runs[0, "fork"]
    for batches in runs.values():
        for batch, expected in zip(batches, reference, strict=True):
            assert batch.n_unreadable == 4 and unreadable.isdisjoint(batch.index.tolist())
            assert torch.equal(batch.index, expected.index) and torch.equal(batch.labels, expected.labels)
            assert all(torch.equal(a, b) for a, b in zip(batch.crops, expected.crops))


STOP_SIGNAL_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from data_pipelines.dali import MultiCropPipeline
from data_pipelines.sources import digits
from sslscale.config import load_config

if __name__ == "__main__":
    data_cfg = load_config(None, ["data.source=digits", "data.batch_size=8", "data.crops=[{{size: 8, count: 2}}]",
                                  "data.num_workers=1", "data.feeder_workers=2"]).data
    batches = iter(MultiCropPipeline(digits("train"), data_cfg, seed=0, rank=0, world_size=1, start_step=0,
                                     num_steps=12))
    next(batches)  # the workers run; the handlers below come later, so they do not inherit them
    received = []
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    os.killpg(0, signal.SIGTERM)  # as SLURM signals every process of a job step
    os.killpg(0, signal.SIGUSR2)
    time.sleep(1)
    print(len(list(batches)), sorted(received))
"""


def test_feeder_workers_outlive_the_stop_signals_the_trainer_handles():
    result = subprocess.run([sys.executable, "-c", STOP_SIGNAL_SCRIPT.format(repo=REPO)], capture_output=True,
                            text=True, start_new_session=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == f"11 {sorted([int(signal.SIGUSR2), int(signal.SIGTERM)])}"


def test_crops_arrive_in_the_models_layout_and_dtype_and_moving_them_is_a_no_op(photo_folder):
    from data_pipelines.loaders import multicrop_batches
    source = image_folder(str(photo_folder / "train"))
    data_cfg = data_config("data.source=folder", f"data.path={photo_folder}", "data.batch_size=6",
                           "data.backend=dali", "data.crops=[{size: 32, count: 2}, {size: 16, count: 1}]")
    kwargs = dict(seed=2, rank=0, world_size=1, start_step=0, num_steps=3)
    plain = list(multicrop_batches(source, data_cfg, **kwargs))  # float32 NCHW, what the torchvision backend gives
    for compute_dtype in (torch.bfloat16, torch.float16):
        model_ready = list(multicrop_batches(source, data_cfg, **kwargs, layout=torch.channels_last,
                                             compute_dtype=compute_dtype))
        for batch, reference in zip(model_ready, plain, strict=True):
            moved = batch.to(torch.device("cpu"), memory_format=torch.channels_last)
            for crop, expected, same in zip(batch.crops, reference.crops, moved.crops, strict=True):
                assert crop.shape == expected.shape and crop.dtype == torch.float16
                assert crop.is_contiguous(memory_format=torch.channels_last) and expected.is_contiguous()
                assert torch.equal(crop, expected.half())  # the float32 crops, rounded once
                assert same is crop
    # DALI's outputs are kept by the tensors that share them: later steps never overwrite earlier batches.
    again = list(multicrop_batches(source, data_cfg, **kwargs))
    assert all(torch.equal(a, b) for x, y in zip(plain, again) for a, b in zip(x.crops, y.crops))


def test_gpu_graph_puts_decode_augmentation_and_ids_on_the_gpu(photo_folder):
    """The GPU pipeline cannot be built without CUDA, but its graph can be traced: the ops and outputs land
    on the devices they must (mixed decode, GPU augmentation, replacement counts on the host)."""
    from data_pipelines.dali import build_pipeline
    from data_pipelines.dali_feeder import StepFeeder
    data_cfg = data_config("data.source=folder", f"data.path={photo_folder}", "data.batch_size=4",
                           "data.crops=[{size: 32, count: 2}, {size: 16, count: 1}]", "data.augment.solarize_p=0.2")
    feeder = StepFeeder(image_folder(str(photo_folder / "train")), data_cfg.crops, data_cfg.augment, seed=0, rank=0,
                        world_size=1, global_batch=4, start_step=0)
    pipe = build_pipeline(feeder, data_cfg.augment, device="gpu", device_id=0, num_threads=1, seed=0,
                          feeder_workers=2, channels_last=True, dtype=torch.float16)
    pipe._build_graph()  # DALI's own trace of the graph (Python side; pipe.build() would need CUDA)
    assert [output.device for output in pipe._graph_outputs] == ["gpu"] * 3 + ["gpu", "cpu"]
    devices = {}
    for op in pipe._ops:
        devices.setdefault(op.name.split("_")[2] if op.name.startswith("__") else op.name, set()).add(op._op.device)
    assert devices["Image"] == {"mixed"} and devices["CropMirrorNormalize"] == {"gpu"}
    assert devices["Resize"] == devices["GaussianBlur"] == devices["Slice"] == {"gpu"}
    assert devices["ExternalSource"] == {"cpu"}


# ---------------------------------------------------------------------------------------------
# Backend choice


def test_backend_and_device_errors_are_clear(monkeypatch):
    with pytest.raises(ConfigError, match="torchvision backend augments on CPU workers; use backend: dali"):
        load_config(None, ["data.device=gpu"])
    with pytest.raises(ConfigError, match="data.device: 'gpu' with train.device: 'cpu'"):
        load_config(None, ["data.backend=dali", "data.device=gpu", "train.device=cpu"])
    with pytest.raises(ConfigError, match="data.backend: 'pil'"):
        load_config(None, ["data.backend=pil"])
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA device is available; use data.device: cpu"):
            require_dali("gpu")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    with pytest.raises(BackendUnavailable, match="NVIDIA DALI is not installed"):
        require_dali("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_pretrain_asking_for_gpu_augmentation_without_a_gpu_stops_before_starting(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sslscale.cli", "pretrain",
                             os.path.join(REPO, "configs", "quickstart.yaml"), f"run.root={tmp_path}",
                             "data.backend=dali", "data.device=gpu"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "data.device: 'gpu' but no CUDA device is available" in result.stderr
    assert not os.path.exists(tmp_path / "quickstart" / "ckpt")


@pytest.mark.slow
def test_trainer_runs_on_dali_from_jpegs_and_shows_its_crops(tiny_config, photo_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslscale.train.loop import pretrain
    os.symlink(photo_folder / "train", tmp_path / "val")
    os.symlink(photo_folder / "train", tmp_path / "train")
    overrides = [f"data.path={tmp_path}", "data.source=folder", "data.batch_size=8",
                 "data.crops=[{size: 16, count: 2}, {size: 8, count: 2, scale: [0.05, 0.3]}]"]
    cfg = tiny_config("data.backend=torchvision", "train.max_steps=2", *overrides)
    pretrain(cfg)
    # The same run resumed on the other backend: the crops are the same, so it may switch.
    cfg = tiny_config("data.backend=dali", "train.max_steps=4", *overrides)
    summary = pretrain(cfg)
    assert np.isfinite(summary["last"]["loss"])
    grid = Image.open(os.path.join(cfg.run_dir, "crops.png"))
    cell = MIN_CELL + PAD  # the crops enlarged to the smallest cell, and a gap
    assert grid.size == (PAD + 5 * cell, HEADER + PAD + 8 * cell)  # the source and 4 crops per row, 8 rows
    events = EventAccumulator(os.path.join(cfg.run_dir, "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("data/crops")] == [0, 2]


def test_preview_command_writes_the_crop_grid(tmp_path):
    out = tmp_path / "crops.png"
    result = subprocess.run([sys.executable, "-m", "sslscale.cli", "preview",
                             os.path.join(REPO, "configs", "quickstart.yaml"), str(out), "data.backend=dali",
                             "--images", "4"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    cell = MIN_CELL + PAD
    assert Image.open(out).size == (PAD + 3 * cell, HEADER + PAD + 4 * cell)  # the source and two crops per image