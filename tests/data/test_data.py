import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.config import DataConfig
from data_pipelines.dali_feeder import JitterPlan, read_encoded
from data_pipelines.image_header import encoded_size
from data_pipelines.loaders import crop_dtype, multicrop_batches
from data_pipelines.params import HUE
from data_pipelines.sources import (
    ClassMismatch,
    RankBatches,
    SampleStream,
    UnreadableImage,
    build_source,
    digits,
    export_image_folder,
    fashion_mnist,
    file_list,
    image_folder,
    random_subset,
)
from data_pipelines.torchvision import MultiCropDataset, collate_multicrop, multicrop_loader
from sslscale.config import load_config

FASHION = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def positions_of_step(step, global_batch, world_size):
    return [p for rank in range(world_size)
            for p in next(iter(RankBatches(global_batch, rank, world_size, start_step=step, num_steps=1)))]


def test_every_sample_once_per_epoch_and_no_sample_lost_at_epoch_ends():
    n, batch = 10, 4  # 10 is not a multiple of 4: epochs end mid-batch
    stream = SampleStream(n, seed=3)
    positions = [p for step in range(5) for p in positions_of_step(step, batch, 2)]
    indices = [stream.index(p) for p in positions]
    assert sorted(indices[:10]) == list(range(10))
    assert sorted(indices[10:20]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a fresh order each epoch


def test_order_depends_on_seed_and_epoch_not_on_world_size():
    one = positions_of_step(7, 8, 1)
    four = positions_of_step(7, 8, 4)
    assert one == four
    assert [SampleStream(50, 1).index(p) for p in range(50)] == [SampleStream(50, 1).index(p) for p in range(50)]
    assert [SampleStream(50, 1).index(p) for p in range(50)] != [SampleStream(50, 2).index(p) for p in range(50)]


def test_ranks_get_disjoint_equal_shards():
    shards = [next(iter(RankBatches(12, r, 3))) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert len(set().union(*map(set, shards))) == 12
    with pytest.raises(ValueError, match="does not split evenly"):
        RankBatches(10, 0, 3)


def test_multicrop_batches_are_large_first_normalised_and_deterministic():
    cfg = load_config(None, ["data.source=digits", "data.batch_size=6", "data.num_workers=0", "data.augment.blur_p=0",
                             "data.crops=[{size: 16, count: 2}, {size: 8, count: 3, scale: [0.05, 0.3]}]"])
    source = digits("train")
    batch = next(iter(multicrop_loader(source, cfg.data, seed=0, rank=0, world_size=1, start_step=0, num_steps=1)))
    assert [tuple(c.shape) for c in batch.crops] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 3
    assert all(c.dtype == torch.float32 for c in batch.crops)
    assert batch.labels.shape == (6,) and batch.index.shape == (6,)
    assert torch.equal(batch.labels, source.labels[batch.index])
    again = next(iter(multicrop_loader(source, cfg.data, seed=0, rank=0, world_size=1, start_step=0, num_steps=1)))
    assert all(torch.equal(a, b) for a, b in zip(batch.crops, again.crops))
    two_crops_differ = not torch.equal(batch.crops[0], batch.crops[1])
    assert two_crops_differ


def test_worker_count_does_not_change_the_crops():
    cfg = load_config(None, ["data.source=digits", "data.batch_size=8", "data.augment.blur_p=0",
                             "data.crops=[{size: 8, count: 2}]"])
    source = digits("train")
    batches = []
    for workers in (0, 2):
        cfg.data.num_workers = workers
        loader = multicrop_loader(source, cfg.data, seed=5, rank=0, world_size=1, start_step=3, num_steps=2)
        batches.append([b.crops[0] for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_image_folder_round_trip_and_corrupt_images_are_skipped_and_counted(tmp_path):
    source = digits("train")
    count = export_image_folder(random_subset(source, 40, seed=0), str(tmp_path / "train"))
    assert count == 40
    folder = image_folder(str(tmp_path / "train"))
    assert len(folder) == 40 and folder.num_classes == len(os.listdir(tmp_path / "train"))
    assert folder.load(0).shape == (3, 8, 8) and folder.load(0).dtype == torch.uint8
    (tmp_path / "train" / "0" / "zz_notes.txt").write_text("not an image")  # ignored: not an image name
    victim = sorted((tmp_path / "train" / folder.classes[0]).iterdir())[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    folder = image_folder(str(tmp_path / "train"))
    assert len(folder) == 40
    dataset = MultiCropDataset(folder, load_config(None, ["data.crops=[{size: 8, count: 2}]"]).data.crops,
                               load_config(None, ["data.augment.blur_p=0"]).data.augment, seed=0)
    samples = [dataset[p] for p in range(40)]
    batch = collate_multicrop(samples)
    assert batch.n_unreadable == 1
    assert folder.paths.index(str(victim)) not in batch.index.tolist()


def test_file_list_source(tmp_path):
    export_image_folder(random_subset(digits("train"), 5, seed=0), str(tmp_path / "imgs"))
    files = sorted(p for p in (tmp_path / "imgs").rglob("*.jpg"))
    (tmp_path / "train.txt").write_text("".join(f"{p.relative_to(tmp_path)} {i % 2}\n" for i, p in enumerate(files)))
    source = file_list(str(tmp_path / "train.txt"))
    assert len(source) == 5 and source.labels.tolist() == [0, 1, 0, 1, 0]
    (tmp_path / "bad.txt").write_text("only_a_path.jpg\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        file_list(str(tmp_path / "bad.txt"))


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    cfg = DataConfig(source="folder", path=str(tmp_path / "nowhere"))
    assert cfg.check_paths() == [f"path: {tmp_path}/nowhere/train does not exist",
                                 f"path: {tmp_path}/nowhere/val does not exist"]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no image files"):
        image_folder(str(tmp_path / "empty"))


def tiny_image_folder(root, classes=("a", "b", "c"), per_class=2, size=(4, 4)):
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (i * 40, 0, 0)).save(root / name / f"{i}.png")


def test_a_stray_empty_class_folder_is_refused_by_name(tmp_path):
    tiny_image_folder(tmp_path / "train")
    (tmp_path / "train" / "a_stray").mkdir()
    with pytest.raises(ClassMismatch, match="without images \\(a_stray\\)"):
        image_folder(str(tmp_path / "train"))


def test_val_classes_must_be_the_train_classes_which_define_the_labels(tmp_path):
    tiny_image_folder(tmp_path / "train", ("a", "b", "c"))
    tiny_image_folder(tmp_path / "val", ("a", "c", "d"))
    cfg = DataConfig(source="folder", path=str(tmp_path))
    with pytest.raises(ClassMismatch, match="missing b; extra d"):
        build_source(cfg, "val")
    # A directory symlink in train/ is a class folder too, so val must have it: the labels never shift silently.
    tiny_image_folder(tmp_path / "val", ("b",))
    os.rename(tmp_path / "val" / "d", tmp_path / "d_elsewhere")
    assert build_source(cfg, "val").labels.tolist() == build_source(cfg, "train").labels.tolist()
    os.symlink(tmp_path / "d_elsewhere", tmp_path / "train" / "aa_link")
    with pytest.raises(ClassMismatch, match="missing aa_link"):
        build_source(cfg, "val")


def test_symlink_loops_are_skipped_and_counted(tmp_path):
    tiny_image_folder(tmp_path / "train")
    os.symlink("loop", tmp_path / "train" / "a" / "loop")  # points at itself
    os.symlink(tmp_path / "train" / "b" / "x.png", tmp_path / "train" / "b" / "x.png")
    os.symlink("zz_loop", tmp_path / "train" / "zz_loop")  # a loop where a class folder could be
    source = image_folder(str(tmp_path / "train"))
    assert len(source) == 6 and source.classes == ["a", "b", "c"]
    assert len(source.skipped) == 3 and all("Too many levels of symbolic links" in s for s in source.skipped)


def test_images_above_the_pixel_limit_are_skipped_before_decoding(tmp_path, monkeypatch):
    tiny_image_folder(tmp_path / "train", size=(64, 32))
    big = str(tmp_path / "train" / "a" / "0.png")
    source = image_folder(str(tmp_path / "train"), max_pixels=64 * 32 - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image above the limit"))
    with pytest.raises(UnreadableImage, match="64x32 pixels is more than data.max_image_pixels"):
        source.load(0)
    with pytest.raises(UnreadableImage, match="data.max_image_pixels"):
        read_encoded(big, max_pixels=64 * 32 - 1)
    monkeypatch.undo()
    assert read_encoded(big, max_pixels=64 * 32).width == 64
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path}", "data.max_image_pixels=100"])
    assert build_source(cfg.data, "train").max_pixels == 100
    assert load_config(None, []).data.max_image_pixels == 8192 * 8192


@pytest.mark.skipif(not FASHION, reason="Debian's dataset-fashion-mnist is not installed (.ci/install installs it)")
def test_fashion_mnist_is_read_from_the_debian_package():
    train, test = fashion_mnist("train"), fashion_mnist("val")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.num_classes == 10 and train.load(0).shape == (3, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert len(build_source(DataConfig(source="fashion_mnist"), "val")) == 10000


# ---------------------------------------------------------------------------------------------
# The DALI feeder's Python side (needs no DALI)


def encoded(array, mode="RGB", fmt="JPEG", **save_args) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, fmt, **save_args)
    return out.getvalue()


def test_image_header_reads_jpeg_and_png_sizes_as_pillow_does_and_leaves_the_rest_to_it():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation tag: the stored size is what counts (DALI decodes without rotating)
    files = [encoded(pixels), encoded(pixels, progressive=True), encoded(pixels, "L"), encoded(pixels, "CMYK"),
             encoded(pixels, exif=exif.tobytes()), encoded(pixels, "RGBA", "PNG"), encoded(pixels, "L", "PNG")]
    for data in files:
        with Image.open(io.BytesIO(data)) as image:
            assert encoded_size(data) == (image.format, image.height, image.width)
    good = files[0]
    for other in (encoded(pixels, fmt="BMP"), encoded(pixels, "P", "GIF"), b"", b"this is not an image",
                  good[:good.find(b"\xff\xc0")] + b"\xff\xd9",  # a JPEG cut before its frame header
                  good[:20]):
        assert encoded_size(other) is None


def test_read_encoded_checks_what_would_stop_a_dali_decoder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    good = encoded(pixels)
    files = {"good.jpg": good, "png.png": encoded(pixels, "RGBA", "PNG"), "gif.gif": encoded(pixels, "P", "GIF"),
             "truncated.jpg": good[:len(good) // 2], "truncated.png": encoded(pixels, fmt="PNG")[:200],
             "empty.jpg": b"", "text.jpg": b"this is not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    image = read_encoded(str(tmp_path / "good.jpg"))
    assert (image.height, image.width) == (30, 40) and image.payload.tobytes() == good
    assert (read_encoded(str(tmp_path / "png.png")).height, read_encoded(str(tmp_path / "png.png")).width) == (30, 40)
    converted = read_encoded(str(tmp_path / "gif.gif"))  # DALI reads no GIF: it gets a BMP
    assert converted.payload[:2].tobytes() == b"BM" and (converted.height, converted.width) == (30, 40)
    for name in ("truncated.jpg", "truncated.png", "empty.jpg", "text.jpg"):
        with pytest.raises(UnreadableImage, match=name):
            read_encoded(str(tmp_path / name))


def per_sample_jitter_plan(plan: JitterPlan, order: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """JitterPlan.steps by its definition, one sample at a time."""
    pre = np.full((len(order), len(plan.blend_ops)), -1)
    post = np.full_like(pre, -1)
    for i, sample_order in enumerate(order):
        if not jitter[i]:
            continue
        split = list(sample_order).index(HUE) if plan.hue else len(sample_order)
        before = [op for op in sample_order[:split] if op in plan.blend_ops]
        after = [op for op in sample_order[split + 1:] if op in plan.blend_ops]
        pre[i, :len(before)], post[i, :len(after)] = before, after
    columns = [(pre if where == "pre" else post)[:, j] == op for where, j in plan.slots for op in plan.blend_ops]
    return np.stack(columns, 1) if columns else np.zeros((len(order), 0), bool)


@pytest.mark.parametrize("zeroed", [[], ["hue"], ["contrast"], ["brightness", "saturation"],
                                    ["brightness", "contrast", "saturation"]])
def test_jitter_plan_of_a_whole_batch_equals_its_per_sample_definition(zeroed):
    spec = load_config(None, [f"data.augment.jitter.{name}=0" for name in zeroed]).data.augment
    plan = JitterPlan(spec)
    rng = np.random.default_rng(len(zeroed))
    order = np.argsort(rng.random((500, 4)), axis=1)
    jitter = rng.random(500) < 0.8
    steps = plan.steps(order, jitter)
    assert steps.shape == (500, len(plan.input_names()))
    assert np.array_equal(steps, per_sample_jitter_plan(plan, order, jitter))


def test_crops_are_asked_for_in_the_compute_dtype_dali_can_write():
    assert crop_dtype(torch.float32) == torch.float32
    assert crop_dtype(torch.float16) == torch.float16
    assert crop_dtype(torch.bfloat16) == torch.float16  # DALI writes no bfloat16
    with pytest.raises(ValueError, match="float64"):
        crop_dtype(torch.float64)


def test_a_negative_number_of_feeder_workers_is_refused():
    from sslscale.config import ConfigError
    with pytest.raises(ConfigError, match="data.feeder_workers: -1; must be >= 0"):
        load_config(None, ["data.feeder_workers=-1"])


def test_torchvision_batches_stay_float32_nchw_whatever_the_model_computes_in():
    cfg = load_config(None, ["data.source=digits", "data.batch_size=4", "data.num_workers=0",
                             "data.augment.blur_p=0", "data.crops=[{size: 8, count: 2}]"])
    batch = next(iter(multicrop_batches(digits("train"), cfg.data, seed=0, rank=0, world_size=1, start_step=0,
                                        num_steps=1, layout=torch.channels_last, compute_dtype=torch.bfloat16)))
    assert all(c.dtype == torch.float32 and c.is_contiguous() for c in batch.crops)


def test_synthetic_gratings_are_fixed_per_split_and_learnable():
    """data.source=synthetic: images from numpy alone (the GPU check on a machine without data sets), the same
    on every call, another draw for val, and the class readable from the image (a nearest-centroid classifier
    on the spectrum's magnitude, fitted on train, gets > 90% of val right; chance is 10%)."""
    from data_pipelines.sources import synthetic
    train, val, again = synthetic("train"), synthetic("val"), synthetic("train")
    assert train.images.shape == (2000, 32, 32) and train.images.dtype == torch.uint8 and len(val) == 500
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images[:500], val.images)
    assert train.load(0).shape == (3, 32, 32) and val.classes == train.classes and len(train.classes) == 10
    assert set(train.labels.tolist()) == set(range(10))

    def spectra(source):
        x = source.images.numpy().astype(np.float32)
        return np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True))).reshape(len(x), -1)
    train_x, val_x, train_y = spectra(train), spectra(val), train.labels.numpy()
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val.labels.numpy()).mean() > 0.9
    assert build_source(DataConfig(source="synthetic"), "val").index_digest() == val.index_digest()

