"""The run configuration: a tree of dataclasses loaded from YAML, with `a.b=value` overrides.

Everything is checked before a run starts: unknown keys, wrong types and impossible values are
collected into one ConfigError whose lines name the key, the bad value and what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field

import yaml

from data_pipelines.augment import AugmentSpec, ColorJitter, CropGroup  # noqa: F401  (types in the tree)
from data_pipelines.config import DataConfig
from sslscale.stop_signals import DEFAULT_SIGNALS as DEFAULT_STOP_SIGNALS
from sslscale.stop_signals import check_names as check_stop_signals

BACKBONES = ("resnet18", "resnet50")
OBJECTIVES = ("dissl", "cissl", "simclr", "dino")
OPTIMIZERS = ("lars", "sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
CLUSTERS = ("slurm", "local", "debug")
COSINE_ORIGINS = ("start", "warmup_end")
INTERVALS = ("step", "epoch")  # how often a schedule changes (optim.lr_interval, objective.dino.tau_t_interval)
DINO_CENTER_UPDATES = ("per_step", "per_view")
DINO_TEACHER_HEAD_INITS = ("copy", "random")
CONTAINER_RUNTIMES = ("pyxis", "apptainer")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "checkpoints"  # run folder = <root>/<name>
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    width: int = 64  # channels of the first stage; 64 is torchvision's ResNet
    dim: int | None = None  # representation dimension; None keeps the trunk's own width
    small_image_stem: bool = False  # 3x3 stride-1 conv1 for images of <= 64 px
    # How the trunk, its dimension block and the heads are initialised (docs/method.md section 8). torchvision:
    # torchvision's kaiming init for every conv, torch's defaults for the heads. authors_imagenet /
    # authors_small_data: the authors' code of that recipe (variance-scaled dimension block with a
    # Johnson-Lindenstrauss first conv; ImageNet: torch's default trunk convs, CISSL Linears into the embedding
    # N(0, 1/dim); small data: variance-scaled small-image stem, every head Linear trunc_normal(0.02)).
    init: str = "torchvision"

    SHAPE_FIELDS = ("backbone", "width", "dim", "small_image_stem")


# Heads are chosen by name: the authors' heads of each recipe (sslscale/models/heads.py, docs/method.md
# section 8). A width left at None is the named head's own. HEADS maps each head key to its role in the
# registry, WIDTHS lists the keys that override a width.


@dataclass
class DisslConfig:
    n_classes: int = 16384  # C, the number of equivalence classes
    lam: float = 2.3  # weight of the marginal entropy H_M
    beta: float = 0.6  # weight of the teacher invariance term CE_inv
    tau_t: float = 0.5
    tau_s: float = 1.0
    beta_warmup_steps: int = 0  # 0: no warm-up (the 800-epoch recipe uses 1000)
    teacher_head: str = "imagenet_d2048"  # imagenet_d2048 | imagenet_d8192 | small_data
    student_head: str = "low_rank_linear"
    teacher_hidden: int | None = None
    teacher_bottleneck: int | None = None
    student_bottleneck: int | None = None

    SHAPE_FIELDS = ("n_classes", "teacher_head", "student_head", "teacher_hidden", "teacher_bottleneck",
                    "student_bottleneck")
    HEADS = {"teacher_head": "dissl_teacher", "student_head": "dissl_student"}
    WIDTHS = ("teacher_hidden", "teacher_bottleneck", "student_bottleneck")


@dataclass
class CisslConfig:
    tau: float = 0.1
    dim: int = 128
    teacher_head: str = "imagenet"  # imagenet | small_data
    student_head: str = "imagenet"  # imagenet | small_data
    teacher_hidden: int | None = None

    SHAPE_FIELDS = ("dim", "teacher_head", "student_head", "teacher_hidden")
    HEADS = {"teacher_head": "cissl_teacher", "student_head": "cissl_student"}
    WIDTHS = ("teacher_hidden",)


@dataclass
class SimclrConfig:
    tau: float = 0.1
    dim: int = 128
    head: str = "imagenet"  # imagenet | small_data: the CISSL teacher MLP of that recipe
    hidden: int | None = None

    SHAPE_FIELDS = ("dim", "head", "hidden")
    HEADS = {"head": "simclr"}
    WIDTHS = ("hidden",)


@dataclass
class DinoConfig:
    n_prototypes: int = 1000
    head: str = "issl_baseline"
    hidden: int | None = None
    bottleneck: int | None = None
    tau_s: float = 0.1
    tau_t_start: float = 0.04
    tau_t_end: float = 0.07
    tau_t_warmup_epochs: float = 50
    # step: tau_t rises linearly every step, reaching tau_t_end at tau_t_warmup_epochs; epoch: a per-epoch
    # linspace of tau_t_warmup_epochs values (the authors' and DINO's own: tau_t_end from epoch
    # tau_t_warmup_epochs - 1 on; needs a whole tau_t_warmup_epochs).
    tau_t_interval: str = "step"
    momentum_start: float = 0.996  # teacher EMA momentum, cosine to 1 per step
    center_momentum: float = 0.9
    # per_step: one EMA update of the centre per step with the mean of every teacher view, after the loss;
    # per_view: one update per teacher view inside its loss term, the next term centred with the updated
    # centre (the authors' code: two updates per step with two views).
    center_update: str = "per_step"
    # copy: the teacher head starts as a copy of the student's; random: a head of its own with its own random
    # initialisation (the authors' code). The teacher trunk is a copy of the student's either way.
    teacher_head_init: str = "copy"
    freeze_last_layer_epochs: float = 1

    SHAPE_FIELDS = ("n_prototypes", "head", "hidden", "bottleneck")
    HEADS = {"head": "dino"}
    WIDTHS = ("hidden", "bottleneck")


@dataclass
class ObjectiveConfig:
    name: str = "dissl"
    dissl: DisslConfig = field(default_factory=DisslConfig)
    cissl: CisslConfig = field(default_factory=CisslConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)

    @property
    def selected(self):
        return getattr(self, self.name)


@dataclass
class OptimConfig:
    name: str = "lars"
    base_lr: float = 0.3  # peak lr = base_lr * global batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9  # sgd / lars
    trust_coefficient: float = 0.001  # lars
    exclude_bias_and_norm: bool = False  # no weight decay (and no LARS scaling) for biases and norms
    warmup_epochs: float = 10
    warmup_start_factor: float = 0.001  # warm-up starts at this fraction of the peak lr (the small-data recipe: 0)
    # Where the cosine after the warm-up counts from. start: lr = peak (1 + cos(pi t / T)) / 2 with t, T from
    # the start of training (the ImageNet recipe; the lr steps down at the end of the warm-up); warmup_end:
    # the cosine restarts there, t and T counted from the end of the warm-up (the small-data recipe).
    cosine_from: str = "start"
    # How often the lr changes. step: every step (the ImageNet recipe); epoch: once per epoch, held through it,
    # as the authors' small-data scheduler (pl_bolts' LinearWarmupCosineAnnealingLR stepped per epoch: the
    # warm-up reaches the peak at epoch warmup_epochs - 1). epoch needs whole warmup_epochs and train.epochs.
    lr_interval: str = "step"
    grad_clip_value: float | None = None
    grad_clip_norm: float | None = None


@dataclass
class TrainConfig:
    epochs: float = 100
    max_steps: int | None = None  # stop early (smoke runs, tests); the schedule still spans `epochs`
    precision: str = "bf16"
    device: str = "auto"
    channels_last: bool = True  # NHWC memory layout for the convnet: faster on GPUs and on x86 CPUs
    # torch.compile the trunk (one graph per crop resolution; the first steps take minutes to compile, on a
    # CPU too). Checkpoints and results are the same as without.
    compile: bool = False
    # Deterministic GPU kernels (cuDNN's deterministic algorithms, no autotuning, PyTorch's deterministic mode
    # with a warning for any op that has none): a resumed run then ends bitwise where an uninterrupted one
    # does on a GPU too, at some speed. CPU runs are deterministic either way.
    deterministic: bool = False
    log_every_steps: int = 50
    max_nonfinite_steps: int = 20  # abort after this many non-finite losses in a row
    # The host reads the device's flags (non-finite steps, stop requests of signals) every this many steps: a
    # signal is acted on, and a non-finite streak noticed, within this many steps. Skipping a non-finite
    # step needs no host read at all: it is decided on the device, every step.
    check_every_steps: int = 10
    # RankMe of the trunk features of the last `rankme_rows` images (all ranks), every this many steps
    # (label_free/rankme in TensorBoard); null: never.
    rankme_every_steps: int | None = 1000
    rankme_rows: int = 4096
    # Signals that make a run save at the next checked step boundary and exit 75 (requeue); every process of
    # a job hears them, workers ignore them (sslscale/stop_signals.py). SIGINT (Ctrl-C) is always handled:
    # once saves and stops the same way, twice aborts at once.
    stop_signals: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_SIGNALS))


@dataclass
class DistConfig:
    strategy: str = "ddp"  # ddp: every rank holds all weights; fsdp: weights and optimizer state sharded (FSDP2)
    timeout_s: float = 600  # a collective waiting longer fails (naming the rank) instead of hanging


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    # Write checkpoints in the background while training goes on (after a copy to host memory; the shards of
    # an FSDP run, the one file of a DDP run). A crash then loses at most the last interval plus the time one
    # write takes.
    async_save: bool = False


@dataclass
class SlurmConfig:
    """How launch/submit.py shapes the job (its flags override these). One task per GPU."""
    cluster: str = "slurm"  # slurm | local (this machine, same job shape) | debug (in the submitting process)
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # None: one per GPU (one task if the job has no GPUs)
    cpus_per_task: int = 10
    mem_gb: int | None = None  # per node; None: the partition's default
    time_min: int = 4320
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: enough for one step and a checkpoint
    max_num_timeout: int = 30  # requeues after time limits (pre-emptions do not count)
    max_crash_retries: int = 2  # requeues after a crash (non-zero exit without a signal), then the job fails
    eval_gpus: int = 1  # the evaluation job: extraction on every GPU, then the probes
    eval_tasks: int | None = None  # tasks of the evaluation job; None: one per eval GPU (one without GPUs)
    eval_time_min: int = 240
    # Run every task inside a container image (docs/containers.md). pyxis: an image reference
    # (registry#name:tag) or a squashfs file (.sqsh); apptainer: a .sif file. None: no container.
    container: str | None = None
    container_runtime: str = "pyxis"  # pyxis (srun --container-image) | apptainer (apptainer exec)
    # Mounts beyond those launch/container.py adds (run root, data, SLURM config, munge): SRC[:DST[:ro|rw]].
    container_mounts: list[str] = field(default_factory=list)
    container_python: str = "/opt/sslscale/venv/bin/python"  # the image's Python (the Dockerfile's venv)
    # Shell lines the job script runs before its tasks start, e.g. ["module load cuda/13.0",
    # "source ~/venvs/sslscale/bin/activate"].
    setup: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def eval_task_count(self) -> int:
        return self.eval_tasks or max(self.eval_gpus, 1)


PROBE_NORMS = ("standardize", "batchnorm", "none")


@dataclass
class LinearProbeConfig:
    enabled: bool = True
    epochs: int = 100
    batch_size: int = 512
    base_lrs: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # lr = base * batch / 256
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-5])
    val_fraction: float = 0.1  # carved from train to choose the sweep point
    # What the heads see: standardize (train-split mean / std, an affine map: still linear in z),
    # batchnorm (BatchNorm1d(affine=False) before the heads, the authors' probe), none (raw features).
    norm: str = "standardize"


@dataclass
class KnnConfig:
    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # all from one similarity pass
    temperature: float = 0.07


@dataclass
class FeatureCacheConfig:
    block_rows: int = 65536  # rows per cache file: the unit of work a rank extracts (and a requeue redoes)
    # The train features are loaded onto the probe's device when their fp16 size is below this; above it,
    # batches are read from the memory-mapped cache (host memory then stays at one chunk).
    max_resident_gb: float = 32.0
    chunk_rows: int = 65536  # rows per chunk when streaming the cache (kNN bank, statistics, RankMe)


@dataclass
class EvalConfig:
    after_pretrain: bool = False  # probe in the same process when pretraining ends
    batch_size: int = 256  # feature extraction, per rank
    recompute_bn_stats: bool = True  # BatchNorm statistics of clean images before extracting
    compare_random_init: bool = True  # probe a randomly initialised trunk of the same shape too
    labels_per_class: list[int] = field(default_factory=list)  # extra probes on few labels per class
    train_images: int | None = None  # probe on a seeded subset of the train split (None: all of it)
    val_images: int | None = None  # test on a seeded subset of the val split (quick checks; None: all of it)
    # Other layers to probe next to the trunk output: module paths inside the saved model. Paths under
    # `encoder.` are read during the trunk's forward (spatial maps are average-pooled); any other path
    # names a module inside a head, and the head (its first two path parts, e.g. objective.teacher_head)
    # is run on the trunk output to reach it. Run folders only: an exported trunk has no heads.
    layers: list[str] = field(default_factory=list)
    rankme: bool = True  # RankMe of the cached train features of every probed layer
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.root, self.run.name)

    def validate(self) -> list[str]:
        return validate(self)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def shape_signature(self) -> dict:
        """The keys that decide tensor shapes: a checkpoint only loads into a config with the same."""
        signature = {f"model.{k}": getattr(self.model, k) for k in ModelConfig.SHAPE_FIELDS}
        signature["objective.name"] = self.objective.name
        selected = self.objective.selected
        signature.update({f"objective.{self.objective.name}.{k}": getattr(selected, k)
                          for k in selected.SHAPE_FIELDS})
        signature["optim.name"] = self.optim.name
        return signature


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | None = None, overrides: list[str] = (), *, check: bool = True) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> a validated Config."""
    raw = read_config_file(path) if path is not None else {}
    problems: list[str] = []
    for item in overrides:
        problems += apply_override(raw, item)
    if problems:
        raise ConfigError(problems)
    return config_from_dict(raw, check=check)


# A config is a few kilobytes; the limits stop a huge file, or a few lines of nested aliases (a "billion
# laughs") that expand to millions of values, before any of it is built or printed in an error message.
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_VALUES = 100_000


def load_yaml(text: str, what: str):
    """yaml.safe_load, refusing a document whose aliases expand to more than MAX_CONFIG_VALUES values."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_CONFIG_VALUES:
            raise ConfigError([f"{what}: its aliases expand to more than {MAX_CONFIG_VALUES:,} values; refused"])
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict) -> int:
    """Values in a YAML node with every alias expanded, counted once per distinct node (memoised)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a node that contains itself counts once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


BASE_KEY = "base"  # a recipe may start from another one: `base: other.yaml`, relative to its own folder


def read_config_file(path: str, _children: tuple[str, ...] = ()) -> dict:
    """A YAML recipe as a dict, with its `base:` chain merged in (the file's own values win; sections
    merge key by key, lists and values are replaced whole)."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigError([f"config file {path} is {os.path.getsize(path):,} bytes; a config is at most "
                               f"{MAX_CONFIG_BYTES:,} (is it the right file?)"])
        with open(path) as f:
            raw = load_yaml(f.read(), f"config file {path}") or {}
    except FileNotFoundError:
        where = f" (the base of {_children[-1]})" if _children else ""
        raise ConfigError([f"config file {path} does not exist{where}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {path} is a folder; give a YAML file in it, e.g. {path}/quickstart.yaml"]
                          ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config file {path} is not a text file (binary content)"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"config file {path} is not valid YAML: {error}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {path}: the top level must be a mapping of sections"])
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError([f"config file {path}: {BASE_KEY}: expected the path of another config, got {base!r}"])
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = (*_children, os.path.normpath(path))
    if base_path in chain:
        raise ConfigError([f"config file {path}: {BASE_KEY}: {base} leads back to itself ({' -> '.join(chain)})"])
    return merge_sections(read_config_file(base_path, chain), raw)


def merge_sections(base: dict, own: dict) -> dict:
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict, *, check: bool = True) -> Config:
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    if check:
        problems = validate(config)
        if problems:
            raise ConfigError(problems)
    return config


def apply_override(raw: dict, item: str) -> list[str]:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        return [f"override {item!r}: expected key=value, e.g. optim.base_lr=0.5"]
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        return [f"override {item!r}: empty key component"]
    try:
        value = load_yaml(text, f"override {item!r}") if text.strip() else ""
    except yaml.YAMLError as error:
        return [f"override {item!r}: the value is not valid YAML ({str(error).splitlines()[0]}); quote it whole "
                "in the shell, e.g. 'data.crops=[{size: 8, count: 2}]'"]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return [f"override {item!r}: {'.'.join(parts[:depth + 1])} is not an index of the list"]
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            return [f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section"]
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return [f"override {item!r}: {last} is not an index of the list"]
        node[int(last)] = value
    else:
        node[last] = value
    return []


def _build(cls, raw, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"unknown key {prefix}{key}{hint}; valid keys here: {', '.join(names)}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{prefix}{name}", problems)
    try:
        return cls(**values)
    except TypeError as error:  # only reachable if coercion let something odd through
        problems.append(f"{prefix.rstrip('.')}: {error}")
        return cls()


def _coerce(value, hint, key: str, problems: list[str]):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, problems)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", problems)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
            return tuple(0.0 for _ in args)
        return tuple(_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{key}: {value!r} is not a finite number")  # .inf overflows every step count
            return 0.0
    elif hint is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(config: Config, path: str) -> None:
    from sslscale.atomic import write_text_atomic
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation of values (types are already right here)


def _choice(key: str, value, valid) -> list[str]:
    return [] if value in valid else [f"{key}: {value!r} is not valid; choose one of {', '.join(valid)}"]


def _positive(key: str, value) -> list[str]:
    return [] if value > 0 else [f"{key}: {value} must be > 0"]


def validate(c: Config) -> list[str]:
    e: list[str] = []
    e += _choice("model.backbone", c.model.backbone, BACKBONES)
    e += _positive("model.width", c.model.width)
    from sslscale.models.backbones import INITS  # one list for the trunk and the heads
    e += _choice("model.init", c.model.init, INITS)
    if c.model.dim is not None:
        e += _positive("model.dim", c.model.dim)
    e += _choice("objective.name", c.objective.name, OBJECTIVES)
    e += [f"data.{p}" for p in c.data.validate()]
    e += _validate_objective(c)
    e += _choice("optim.name", c.optim.name, OPTIMIZERS)
    e += _positive("optim.base_lr", c.optim.base_lr)
    if c.optim.weight_decay < 0:
        e.append(f"optim.weight_decay: {c.optim.weight_decay} must be >= 0")
    if not 0 <= c.optim.momentum < 1:
        e.append(f"optim.momentum: {c.optim.momentum}; valid range is [0, 1)")
    e += _choice("optim.cosine_from", c.optim.cosine_from, COSINE_ORIGINS)
    e += _choice("optim.lr_interval", c.optim.lr_interval, INTERVALS)
    if c.optim.lr_interval == "epoch":
        for key, value in (("optim.warmup_epochs", c.optim.warmup_epochs), ("train.epochs", c.train.epochs)):
            if not float(value).is_integer():
                e.append(f"{key}: {value}; optim.lr_interval: epoch steps the lr once per epoch and needs whole "
                         f"epochs (or use optim.lr_interval: step)")
    if not 0 <= c.optim.warmup_start_factor <= 1:
        e.append(f"optim.warmup_start_factor: {c.optim.warmup_start_factor}; valid range is [0, 1]")
    for key in ("grad_clip_value", "grad_clip_norm"):
        if getattr(c.optim, key) is not None:
            e += _positive(f"optim.{key}", getattr(c.optim, key))
    e += _positive("train.epochs", c.train.epochs)
    if not 0 <= c.optim.warmup_epochs <= c.train.epochs:
        e.append(f"optim.warmup_epochs: {c.optim.warmup_epochs}; must be between 0 and train.epochs "
                 f"({c.train.epochs})")
    if c.train.max_steps is not None:
        e += _positive("train.max_steps", c.train.max_steps)
    e += _choice("train.precision", c.train.precision, PRECISIONS)
    e += _choice("train.device", c.train.device, DEVICES)
    if c.data.device == "gpu" and c.train.device == "cpu":
        e.append("data.device: 'gpu' with train.device: 'cpu' would augment on a GPU only to copy every crop back; "
                 "use data.device: cpu, or train.device: auto / cuda")
    e += _positive("train.log_every_steps", c.train.log_every_steps)
    e += _positive("train.max_nonfinite_steps", c.train.max_nonfinite_steps)
    e += _positive("train.check_every_steps", c.train.check_every_steps)
    e += check_stop_signals(c.train.stop_signals)
    e += _choice("dist.strategy", c.dist.strategy, STRATEGIES)
    e += _positive("dist.timeout_s", c.dist.timeout_s)
    e += _positive("checkpoint.every_steps", c.checkpoint.every_steps)
    e += _positive("checkpoint.keep", c.checkpoint.keep)
    if c.train.rankme_every_steps is not None:
        e += _positive("train.rankme_every_steps", c.train.rankme_every_steps)
    e += _positive("train.rankme_rows", c.train.rankme_rows)
    e += _validate_eval(c.eval)
    e += _validate_slurm(c.slurm)
    if not c.run.name or "/" in c.run.name:
        e.append(f"run.name: {c.run.name!r}; give a non-empty name without '/'")
    return e


def _validate_eval(v: EvalConfig) -> list[str]:
    e = _positive("eval.batch_size", v.batch_size)
    e += [f"eval.labels_per_class: {n} must be > 0" for n in v.labels_per_class if n <= 0]
    if len(set(v.labels_per_class)) != len(v.labels_per_class):
        e.append(f"eval.labels_per_class: {v.labels_per_class} names a budget twice")
    for key in ("train_images", "val_images"):
        if getattr(v, key) is not None:
            e += _positive(f"eval.{key}", getattr(v, key))
    for path in v.layers:
        parts = path.split(".")
        if not all(parts) or (parts[0] != "encoder" and len(parts) < 3):
            e.append(f"eval.layers: {path!r} is not a module path inside a head or the encoder; e.g. "
                     "objective.teacher_head.0 (a module inside the head objective.teacher_head) or encoder.layer3")
    if len(set(v.layers)) != len(v.layers) or "trunk" in v.layers:
        e.append(f"eval.layers: {v.layers}: each path once, and not 'trunk' (the trunk output is always probed)")
    e += _positive("eval.linear.epochs", v.linear.epochs)
    e += _positive("eval.linear.batch_size", v.linear.batch_size)
    if not v.linear.base_lrs or not v.linear.weight_decays:
        e.append("eval.linear: base_lrs and weight_decays each need at least one value")
    e += [f"eval.linear.base_lrs: {x} must be > 0" for x in v.linear.base_lrs if x <= 0]
    e += [f"eval.linear.weight_decays: {x} must be >= 0" for x in v.linear.weight_decays if x < 0]
    if not 0 < v.linear.val_fraction < 1:
        e.append(f"eval.linear.val_fraction: {v.linear.val_fraction}; valid range is (0, 1)")
    e += _choice("eval.linear.norm", v.linear.norm, PROBE_NORMS)
    if not v.knn.k:
        e.append("eval.knn.k: give at least one k, e.g. [10, 20, 100, 200]")
    e += [f"eval.knn.k: {k} must be > 0" for k in v.knn.k if k <= 0]
    e += _positive("eval.knn.temperature", v.knn.temperature)
    for key in ("block_rows", "chunk_rows", "max_resident_gb"):
        e += _positive(f"eval.cache.{key}", getattr(v.cache, key))
    return e


def _validate_slurm(s: SlurmConfig) -> list[str]:
    e = _choice("slurm.cluster", s.cluster, CLUSTERS)
    for key in ("nodes", "cpus_per_task", "time_min", "eval_time_min"):
        e += _positive(f"slurm.{key}", getattr(s, key))
    for key in ("tasks_per_node", "mem_gb", "eval_tasks"):
        if getattr(s, key) is not None:
            e += _positive(f"slurm.{key}", getattr(s, key))
    for key in ("gpus_per_node", "eval_gpus", "signal_delay_s", "max_num_timeout", "max_crash_retries"):
        if getattr(s, key) < 0:
            e.append(f"slurm.{key}: {getattr(s, key)} must be >= 0")
    if s.signal_delay_s >= s.time_min * 60:
        e.append(f"slurm.signal_delay_s: {s.signal_delay_s} s is not shorter than slurm.time_min ({s.time_min} min)")
    return e + _validate_container(s)


def _validate_container(s: SlurmConfig) -> list[str]:
    e = _choice("slurm.container_runtime", s.container_runtime, CONTAINER_RUNTIMES)
    if s.container is not None:
        if not s.container.strip() or any(c.isspace() for c in s.container):
            e.append(f"slurm.container: {s.container!r}; give an image without spaces, or null for no container")
        elif s.container_runtime == "apptainer" and "://" in s.container:
            e.append(f"slurm.container: {s.container!r}; apptainer would convert it on every task: build a .sif "
                     f"file once (apptainer build sslscale.sif {s.container}) and give its path")
        if s.cluster != "slurm":
            e.append(f"slurm.container: runs tasks through srun or apptainer inside a SLURM job; slurm.cluster "
                     f"is {s.cluster!r} (use slurm, or container: null)")
    for mount in s.container_mounts:
        parts = mount.split(":")
        if "," in mount or len(parts) > 3 or not all(p.startswith("/") for p in parts[:2]) \
                or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            e.append(f"slurm.container_mounts: {mount!r}; expected SRC, SRC:DST or SRC:DST:ro|rw with absolute "
                     "paths and no commas")
    if not s.container_python.startswith("/") or any(c.isspace() for c in s.container_python):
        e.append(f"slurm.container_python: {s.container_python!r}; give the absolute path of Python inside the image")
    return e


def _validate_heads(name: str, section) -> list[str]:
    """Head names against the registry of their role, widths > 0 where given."""
    from sslscale.models.heads import HEADS
    e = []
    for key, role in section.HEADS.items():
        e += _choice(f"objective.{name}.{key}", getattr(section, key), tuple(HEADS[role]))
    for key in section.WIDTHS:
        if getattr(section, key) is not None:
            e += _positive(f"objective.{name}.{key}", getattr(section, key))
    return e


def _validate_objective(c: Config) -> list[str]:
    e: list[str] = []
    n_crops = sum(g.count for g in c.data.crops)
    n_large = c.data.crops[0].count if c.data.crops else 0
    name = c.objective.name
    if name in OBJECTIVES:
        e += _validate_heads(name, c.objective.selected)
    if name == "dissl":
        d = c.objective.dissl
        if d.n_classes < 2:
            e.append(f"objective.dissl.n_classes: {d.n_classes}; C must be >= 2")
        for key in ("tau_t", "tau_s"):
            e += _positive(f"objective.dissl.{key}", getattr(d, key))
        if d.beta_warmup_steps < 0:
            e.append(f"objective.dissl.beta_warmup_steps: {d.beta_warmup_steps} must be >= 0")
        if d.lam < d.beta + 1:
            warnings.warn(f"objective.dissl: lam ({d.lam}) < beta + 1 ({d.beta + 1}); the DISSL theory asks "
                          f"for lam >= beta + 1 to avoid collapse", stacklevel=2)
    if name in ("dissl", "dino") and n_large < 2:
        e.append(f"data.crops[0].count: {n_large}; {name} needs at least 2 large crops for its teacher")
    if name in ("cissl", "simclr") and (n_crops != 2 or len(c.data.crops) != 1):
        e.append(f"data.crops: {name} uses exactly two views of one size, got "
                 f"{[(g.count, g.size) for g in c.data.crops]} (count, size)")
    if name == "cissl":
        e += _positive("objective.cissl.tau", c.objective.cissl.tau)
        e += _positive("objective.cissl.dim", c.objective.cissl.dim)
    if name == "simclr":
        e += _positive("objective.simclr.tau", c.objective.simclr.tau)
        e += _positive("objective.simclr.dim", c.objective.simclr.dim)
    if name == "dino":
        d = c.objective.dino
        for key in ("n_prototypes", "tau_s", "tau_t_start", "tau_t_end"):
            e += _positive(f"objective.dino.{key}", getattr(d, key))
        for key in ("momentum_start", "center_momentum"):
            if not 0 <= getattr(d, key) <= 1:
                e.append(f"objective.dino.{key}: {getattr(d, key)}; valid range is [0, 1]")
        e += _choice("objective.dino.tau_t_interval", d.tau_t_interval, INTERVALS)
        e += _choice("objective.dino.center_update", d.center_update, DINO_CENTER_UPDATES)
        e += _choice("objective.dino.teacher_head_init", d.teacher_head_init, DINO_TEACHER_HEAD_INITS)
        if d.tau_t_interval == "epoch" and not float(d.tau_t_warmup_epochs).is_integer():
            e.append(f"objective.dino.tau_t_warmup_epochs: {d.tau_t_warmup_epochs}; objective.dino.tau_t_interval: "
                     f"epoch takes one value per epoch and needs whole epochs (or use tau_t_interval: step)")
    return e
