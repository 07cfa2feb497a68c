"""Image sources (what images exist, their labels) and the deterministic sample stream.

A source maps an index to a decoded uint8 image [3, H, W] and a label. The stream decides which
index each training step reads: it is the concatenation of one permutation per epoch, seeded by
(seed, epoch) only, and step k of a run with global batch N reads stream positions
[k*N, (k+1)*N). So the order does not depend on the number of ranks or workers, no sample is
dropped at an epoch end, and the whole sampler state is the number of samples consumed.
"""
from __future__ import annotations

import abc
import gzip
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """An image that exists in the index but cannot be decoded (truncated, not an image, ...)."""


# Replacement attempts for unreadable images before giving up on a sample.
MAX_REPLACEMENTS = 64
# data.max_image_pixels' default: larger images are refused from their header, before a decode that would
# take gigabytes per worker (13000 x 13000 RGB is 0.5 GB of pixels, several times that while decoding).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


def check_pixels(path: str, height: int, width: int, max_pixels: int | None) -> None:
    """Raises UnreadableImage (skipped and counted like a corrupt file) for an image above the limit."""
    if max_pixels and height * width > max_pixels:
        raise UnreadableImage(f"{path}: {width}x{height} pixels is more than data.max_image_pixels ({max_pixels})")


def first_readable(read, size: int, index: int):
    """(read(i), i, replacements) for the first i = index, index + 1, ... (mod size) that reads: an
    unreadable image is replaced by the next one, by every backend, so the stream stays deterministic."""
    for attempt in range(MAX_REPLACEMENTS):
        candidate = (index + attempt) % size
        try:
            return read(candidate), candidate, attempt
        except UnreadableImage as error:
            log.warning("skipping unreadable image: %s", error)
    raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable images from index {index}; is the data intact?")


class ImageSource(abc.ABC):
    """Indexable images with labels. Subclasses set `labels`, `classes` and implement `load`."""

    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abc.abstractmethod
    def load(self, index: int) -> torch.Tensor:
        """The image as uint8 [3, H, W] (grayscale is repeated to three channels)."""

    def path(self, index: int) -> str | None:
        """The file image `index` is read from; None for images held in memory."""
        return None

    def index_digest(self) -> str:
        """A hash of which images, in which order, with which labels and class names: what a cache of
        features of this source must match."""
        digest = hashlib.sha256(self._index_bytes())
        digest.update("\n".join(self.classes).encode())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    @abc.abstractmethod
    def _index_bytes(self) -> bytes:
        """What identifies the images themselves."""


class ArraySource(ImageSource):
    """Images held in memory as one uint8 array [n, H, W] (grayscale) or [n, H, W, 3]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.images = torch.from_numpy(np.array(images, copy=True))  # writable, owned by the tensor
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes = classes

    def _index_bytes(self) -> bytes:
        return hashlib.sha256(self.images.numpy().tobytes()).digest()

    def load(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if image.ndim == 2:
            return image.unsqueeze(0).expand(3, -1, -1)
        return image.permute(2, 0, 1)


class FileSource(ImageSource):
    """Images as files on disk, decoded on load (JPEG, PNG; CMYK and grayscale become RGB)."""

    def __init__(self, paths: list[str], labels: list[int], classes: list[str], max_pixels: int | None = None,
                 skipped: list[str] = ()):
        if not paths:
            raise FileNotFoundError("no image files found")
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.classes = classes
        self.max_pixels = max_pixels
        self.skipped = list(skipped)  # entries of the folder that could not be read when it was indexed
        self._stat_digest = None  # the files' stats, read once per source (sources are built per evaluation)

    def path(self, index: int) -> str:
        return self.paths[index]

    def _index_bytes(self) -> bytes:
        # What the files are, not only their names: the resolved path, size and modification time of each,
        # so images replaced under the same names, or another folder with the same names, are another index.
        if self._stat_digest is None:
            digest = hashlib.sha256()
            for path in self.paths:
                try:
                    st = os.stat(path)
                    digest.update(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(f"{os.path.realpath(path)}|missing\n".encode())
            self._stat_digest = digest.digest()
        return self._stat_digest

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:  # reads the header only: the size is known before decoding
                check_pixels(path, image.height, image.width, self.max_pixels)
                rgb = np.asarray(image.convert("RGB"))  # decodes fully: truncated files fail here
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(f"{path}: {error}") from error
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


class Subset(ImageSource):
    """Some images of another source, in the given order."""

    def __init__(self, source: ImageSource, indices: torch.Tensor):
        self.source, self.indices = source, indices
        self.labels = source.labels[indices]
        self.classes = source.classes
        self.max_pixels = getattr(source, "max_pixels", None)

    def load(self, index: int) -> torch.Tensor:
        return self.source.load(int(self.indices[index]))

    def _index_bytes(self) -> bytes:
        return self.source.index_digest().encode() + self.indices.numpy().astype("int64").tobytes()

    def path(self, index: int) -> str | None:
        return self.source.path(int(self.indices[index]))


def random_subset(source: ImageSource, size: int | None, seed: int) -> ImageSource:
    """A seeded random subset of `size` images (the source itself when size is None or too large)."""
    if size is None or size >= len(source):
        return source
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return Subset(source, order[:size].sort().values)


class ClassMismatch(ValueError):
    """The class folders of a split do not name the train split's classes (labels would shift)."""


def _entries(folder: str, skipped: list[str]):
    """(name, is_dir, is_file) of a folder's entries; entries that cannot be read (a symlink loop, a
    dangling link, no permission) go to `skipped` instead of stopping the indexing with a traceback."""
    for entry in os.scandir(folder):
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
            if not (is_dir or is_file):
                os.stat(entry.path)  # a dangling link or a loop says why here
        except OSError as error:
            skipped.append(f"{entry.path}: {error.strerror}")
            continue
        if is_dir or is_file:
            yield entry.name, is_dir, is_file


def _names(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def class_folders(root: str, skipped: list[str] | None = None) -> list[str]:
    """The sorted class folder names of a split."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(name for name, is_dir, _ in _entries(root, [] if skipped is None else skipped) if is_dir)
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders")
    return classes


def image_folder(root: str, classes: list[str] | None = None, max_pixels: int | None = None) -> FileSource:
    """ImageNet layout: root/<class name>/<image file>. Classes are sorted names; `classes` (the train
    split's) gives the label indices, and this split's folders must be exactly those: a stray folder or a
    missing one would shift every label after it. A class folder without images is refused by name."""
    skipped: list[str] = []
    found = class_folders(root, skipped)
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        differences = [f"{what} {_names(names)}" for what, names in (("missing", missing), ("extra", extra)) if names]
        raise ClassMismatch(f"image folder {root} does not have the train split's class folders ("
                            f"{'; '.join(differences)}): its labels would not match the train split's")
    paths, labels, empty = [], [], []
    for label, name in enumerate(found):
        files = sorted(f for f, _, is_file in _entries(os.path.join(root, name), skipped)
                       if is_file and f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(name)
        paths += [os.path.join(root, name, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"image folder {root} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise ClassMismatch(f"image folder {root}: class folder(s) without images ({_names(empty)}); each would be "
                            "a class of its own and shift the labels: remove them or fill them")
    if skipped:
        log.warning("%s: %d unreadable entries skipped (e.g. %s)", root, len(skipped), skipped[0])
    return FileSource(paths, labels, found, max_pixels, skipped)


def file_list(list_path: str) -> FileSource:
    """Lines of `relative/path.jpg <integer label>`, paths relative to the list's folder."""
    base = os.path.dirname(os.path.abspath(list_path))
    paths, labels = [], []
    with open(list_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_path}:{number}: expected '<path> <integer label>', got {line.strip()!r}")
            paths.append(os.path.join(base, parts[0]))
            labels.append(int(parts[1]))
    if not paths:
        raise FileNotFoundError(f"file list {list_path} is empty")
    num_classes = max(labels) + 1
    return FileSource(paths, labels, [str(c) for c in range(num_classes)])


def fashion_mnist_files(root: str | None) -> dict[str, str]:
    root = root or FASHION_MNIST_DIR
    return {f"{split}_{kind}": os.path.join(root, f"{prefix}-{kind}-{idx}-ubyte.gz")
            for split, prefix in (("train", "train"), ("val", "t10k"))
            for kind, idx in (("images", "idx3"), ("labels", "idx1"))}


FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def fashion_mnist(split: str, root: str | None = None) -> ArraySource:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale) from its idx files."""
    files = fashion_mnist_files(root)
    with gzip.open(files[f"{split}_images"]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(files[f"{split}_labels"]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return ArraySource(images, labels, FASHION_MNIST_CLASSES)


def digits(split: str) -> ArraySource:
    """scikit-learn's 1,797 8x8 digits (for tiny tests): a fixed shuffled 1,497 / 300 split."""
    from sklearn.datasets import load_digits
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    order = order[:1497] if split == "train" else order[1497:]
    images = np.round(data.images[order] * (255 / 16)).astype(np.uint8)
    return ArraySource(images, data.target[order], [str(d) for d in range(10)])


SYNTHETIC_SIZES = {"train": 2000, "val": 500}


def synthetic(split: str) -> ArraySource:
    """Gratings made by numpy alone, for machines with no data set and nothing beyond sslscale's requirements
    (benchmarks/gpu_check.py on a bare GPU node): 10 classes of 32x32 grayscale sine gratings, one orientation
    per class, with random phase, contrast and pixel noise; 2,000 train / 500 val images, fixed by the split.
    Learnable, so losses move, but no benchmark: its accuracies say nothing about a method."""
    rng = np.random.default_rng(SPLITS.index(split))
    n = SYNTHETIC_SIZES[split]
    labels = rng.integers(0, 10, n)
    angle = labels * (np.pi / 10) + rng.normal(0, 0.05, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    contrast = rng.uniform(50, 110, n)
    y, x = np.mgrid[0:32, 0:32].astype(np.float64)
    wave = np.sin(0.6 * (x[None] * np.cos(angle)[:, None, None] + y[None] * np.sin(angle)[:, None, None])
                  + phase[:, None, None])
    images = 128 + contrast[:, None, None] * wave + rng.normal(0, 12, (n, 32, 32))
    return ArraySource(np.clip(np.round(images), 0, 255).astype(np.uint8), labels, [f"angle-{c}" for c in range(10)])


def build_source(data_cfg, split: str) -> ImageSource:
    """The `split` ("train" or "val") of the source a DataConfig names. Label indices come from one place:
    the train split's class folders, which every other split must match."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; valid: {', '.join(SPLITS)}")
    if data_cfg.source == "fashion_mnist":
        return fashion_mnist(split, data_cfg.path)
    if data_cfg.source == "digits":
        return digits(split)
    if data_cfg.source == "synthetic":
        return synthetic(split)
    max_pixels = getattr(data_cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if data_cfg.source == "folder":
        classes = None if split == "train" else class_folders(os.path.join(data_cfg.path, "train"))
        return image_folder(os.path.join(data_cfg.path, split), classes, max_pixels)
    if data_cfg.source == "filelist":
        source = file_list(os.path.join(data_cfg.path, f"{split}.txt"))
        source.max_pixels = max_pixels
        return source
    raise ValueError(f"unknown data source {data_cfg.source!r}")


def export_image_folder(source: ImageSource, dest: str, limit: int | None = None) -> int:
    """Write a source as an image folder of JPEGs (dest/<class>/<index>.jpg). Writes to a temp folder
    and renames it, so an interrupted export never leaves a half folder that looks complete."""
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; remove it or choose another destination")
    tmp = dest.rstrip("/") + ".partial"
    count = len(source) if limit is None else min(limit, len(source))
    for name in source.classes:
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
    for i in range(count):
        label = int(source.labels[i])
        pixels = source.load(i).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(os.path.join(tmp, source.classes[label], f"{i:07d}.jpg"), quality=95)
    os.rename(tmp, dest)
    return count


@dataclass
class SampleStream:
    """Maps a stream position to a sample index: position p is item p % n of epoch p // n's
    permutation, drawn from a generator seeded by (seed, epoch)."""

    size: int
    seed: int

    def __post_init__(self):
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._order

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(self.epoch_order(epoch)[offset])


class RankBatches(torch.utils.data.Sampler):
    """Yields, for each step from `start_step` on, this rank's stream positions of the global batch."""

    def __init__(self, global_batch: int, rank: int, world_size: int, start_step: int = 0,
                 num_steps: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} ranks")
        self.local_batch = global_batch // world_size
        self.global_batch, self.rank = global_batch, rank
        self.start_step, self.num_steps = start_step, num_steps

    def __iter__(self):
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            first = step * self.global_batch + self.rank * self.local_batch
            yield list(range(first, first + self.local_batch))
            step += 1

    def __len__(self):
        if self.num_steps is None:
            raise TypeError("an endless sampler has no length")
        return self.num_steps
