"""`sslscale pretrain | plan | bench | linear-eval | knn | export | verify | prepare-data | imagenet-val | preview |
recipes`.

Errors a user can fix (bad config, missing data, mismatched checkpoint) print one clear message and
exit with status 2; a run stopped by a stop signal (train.stop_signals; a first Ctrl-C) exits with
EXIT_STOPPED_FOR_REQUEUE after saving a checkpoint; a second Ctrl-C aborts with 130 (stop_signals.py);
a save that fails for lack of space or permission exits with EXIT_DISK_ERROR (74, sslscale/checkpoint/disk.py)
after removing what it half wrote.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from sslscale.checkpoint.integrity import NoUsableCheckpoint
from sslscale.checkpoint.store import CheckpointMismatch
from sslscale.dist.peer_watch import RankFailure
from sslscale.dist.process_group import DistributedSetupError, HostUnreachable

EXIT_USER_ERROR = 2


def pretrain_then_probe(cfg) -> None:
    """Pretrain, then (eval.after_pretrain) probe the frozen trunk. The probe is a single-process job:
    under torchrun / srun / submitit only rank 0 runs it.

    One StopSignals object hears the stop signals from start to end, so a signal in either stage (or
    between them) ends the job with a checkpoint / the finished feature blocks, and StoppedForRequeue.
    A rerun finds the pretraining done (nothing to train) and probes from the feature cache."""
    from sslscale.dist.process_group import read_env
    from sslscale.eval.run import evaluate_run
    from sslscale.train.console import console_log
    from sslscale.train.loop import pretrain
    from sslscale.train.stop_signals import StoppedForRequeue, StopSignals, describe_signal
    is_main = read_env().is_main
    with console_log(cfg.run_dir, is_main, " ".join(sys.argv)) as log_only, \
            StopSignals(cfg.train.stop_signals, announce=is_main) as stop:
        try:
            pretrain(cfg)
            if cfg.eval.after_pretrain and is_main:
                if stop.requested:  # heard after the last step: the pretraining is saved, the probe not begun
                    raise StoppedForRequeue(f"stopped by {describe_signal(stop.received)} after pretraining "
                                            f"{cfg.run_dir}; the probe runs when it is resumed",
                                            frozenset(stop.all_received))
                evaluate_run(cfg, single_process=True)
        except BaseException as error:  # the reason a run ended belongs in its log; main() prints it
            log_only(f"ended: {type(error).__name__}: {error}")
            raise


def _pretrain(args) -> int:
    from sslscale.config import load_config
    pretrain_then_probe(load_config(args.config, args.overrides))
    return 0


def _plan(args) -> int:
    import json

    from data_pipelines.sources import build_source
    from sslscale.config import ConfigError, load_config
    from sslscale.cost.plan import format_plan, make_plan
    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError([f"--world-size: {args.world_size}; must be >= 1"])
    dataset_size = args.dataset_size
    if dataset_size is None:
        problems = [f"data.{p}" for p in cfg.data.check_paths()]
        if problems:
            raise ConfigError(problems + ["(to plan without the data, give its size: --dataset-size N; "
                                          "ImageNet-1k train has 1281167 images)"])
        dataset_size = len(build_source(cfg.data, "train"))
    elif dataset_size < 1:
        raise ConfigError([f"--dataset-size: {dataset_size}; must be >= 1"])
    plan = make_plan(cfg, dataset_size=dataset_size, world_size=args.world_size, flops=not args.no_flops)
    if args.json:
        print(json.dumps(plan))
    else:
        print(format_plan(plan, f"plan of {args.config} (run folder {cfg.run_dir})"))
    return 0


def _bench(args) -> int:
    from sslscale.config import ConfigError, load_config
    from sslscale.dist.process_group import read_env
    from sslscale.train.bench import MEASUREMENTS, print_results, run_bench
    cfg = load_config(args.config, args.overrides)
    only = args.only.split(",") if args.only else list(MEASUREMENTS)
    unknown = [m for m in only if m not in MEASUREMENTS]
    problems = [f"--only: {', '.join(unknown)}; valid: {', '.join(MEASUREMENTS)}"] if unknown else []
    problems += [f"--{name}: {value}; must be >= {low}" for name, value, low in
                 (("steps", args.steps, 1), ("warmup", args.warmup, 0)) if value < low]
    if problems:
        raise ConfigError(problems)
    results = run_bench(cfg, steps=args.steps, warmup=args.warmup, measurements=only)
    if read_env().is_main:
        print_results(results, args.json, sys.stdout)
    return 0


def _evaluate(args, output: str, extra: list[str]) -> int:
    """A run folder (its config and newest checkpoint) or a trunk file (with --config for data and eval)."""
    from sslscale.checkpoint.run_folder import load_run_config
    from sslscale.config import ConfigError, load_config
    from sslscale.eval.run import evaluate
    overrides = [*args.overrides, *extra]
    if os.path.isfile(args.target):
        if args.config is None:
            raise ConfigError([f"{args.target} is a trunk file: give --config CONFIG for the data and eval settings "
                               "(e.g. configs/quickstart.yaml); the trunk's shape comes from the file"])
        cfg = load_config(args.config, overrides)
        out = args.out or os.path.splitext(args.target)[0] + "_eval"
        evaluate(cfg, trunk_file=args.target, eval_dir=out, output=output)
        return 0
    if args.config is not None:
        raise ConfigError([f"--config is for trunk files; {args.target} is evaluated with its own config.yaml"])
    evaluate(load_run_config(args.target, overrides), eval_dir=args.out, output=output)
    return 0


def _linear_eval(args) -> int:
    return _evaluate(args, "linear.json", [])


def _knn(args) -> int:
    return _evaluate(args, "knn.json", ["eval.linear.enabled=false", "eval.knn.enabled=true"])


def _export(args) -> int:
    from sslscale.checkpoint.run_folder import load_run_config
    from sslscale.checkpoint.store import Checkpointer, trunk_state
    from sslscale.checkpoint.trunk_file import TrunkFileError, check_output_path, save_trunk_file
    from sslscale.config import ConfigError
    check_output_path(args.output)  # before the checkpoint is read: a bad destination costs nothing
    cfg = load_run_config(args.run_dir)
    restored = Checkpointer(cfg.run_dir, cfg.checkpoint.keep).load_latest(model_only=True)
    if restored is None:
        raise ConfigError([f"run folder {args.run_dir} has no complete checkpoint to export"])
    state, name = restored
    trunk = trunk_state(state["model"])
    if not trunk:
        raise TrunkFileError(f"checkpoint {name} of {args.run_dir} has no trunk (no encoder.* entries)")
    shape = {k: getattr(cfg.model, k) for k in ("backbone", "width", "dim", "small_image_stem")}
    save_trunk_file(trunk, args.output, shape, {"run": cfg.run.name, "objective": cfg.objective.name,
                                                 "checkpoint": name, "step": state["progress"]["step"]})
    print(f"wrote {args.output}: trunk of {name} ({len(trunk)} tensors, the published layout: torchvision key names, "
          f"no fc, no heads; shape {shape} recorded as metadata)")
    return 0


def _verify(args) -> int:
    from sslscale.checkpoint.verify import verify_run
    from sslscale.config import ConfigError
    if not os.path.isdir(os.path.join(args.run_dir, "ckpt")):
        raise ConfigError([f"{args.run_dir} is not a run folder (no ckpt/ in it)"])
    return verify_run(args.run_dir, sys.stdout)


def _prepare_data(args) -> int:
    from data_pipelines.config import DataConfig
    from data_pipelines.sources import build_source, export_image_folder
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1 (images per split)")
    if os.path.exists(args.dest) and not os.path.isdir(args.dest):
        raise UsageError(f"{args.dest} is a file; give a folder to create (it will hold train/ and val/)")
    data_cfg = DataConfig(source=args.source, path=args.source_path)
    for split in ("train", "val"):
        count = export_image_folder(build_source(data_cfg, split), os.path.join(args.dest, split), args.limit)
        print(f"wrote {count} {split} images to {os.path.join(args.dest, split)}")
    print(f"use it with: data.source=folder data.path={args.dest}")
    return 0


def _imagenet_val(args) -> int:
    from data_pipelines.imagenet_val import read_labels, sort_into_class_folders
    from sslscale.config import ConfigError
    for path in (args.val_dir, args.labels, *([args.train_dir] if args.train_dir else [])):
        if not os.path.exists(path):
            raise ConfigError([f"{path} does not exist"])
    train_classes = sorted(e.name for e in os.scandir(args.train_dir) if e.is_dir()) if args.train_dir else None
    try:
        counts = sort_into_class_folders(args.val_dir, read_labels(args.labels), train_classes, args.dry_run)
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {counts['moved']} images into class folders of {args.val_dir}; {counts['in_place']} were in place"
          + (f"; {counts['missing']} listed images are nowhere" if counts["missing"] else ""))
    return 0 if not counts["missing"] else EXIT_USER_ERROR


MAX_PREVIEW_IMAGES = 256  # rows of one preview grid
MAX_PREVIEW_PHOTO_STEP = 10_000  # the sample-photo source holds images * (step + 1) labels


class UsageError(Exception):
    """A command-line value that cannot work: one line, exit status 2."""


def _preview(args) -> int:
    from data_pipelines.loaders import multicrop_batches
    from data_pipelines.preview import crop_grid, sample_photos, save_png
    from data_pipelines.sources import build_source
    from sslscale.config import ConfigError, load_config
    if args.images < 1:
        raise ConfigError([f"--images: {args.images}; must be >= 1"])
    if args.images > MAX_PREVIEW_IMAGES:
        raise UsageError(f"--images {args.images}: at most {MAX_PREVIEW_IMAGES} rows fit in one grid")
    if args.step < 0:
        raise UsageError(f"--step {args.step}: must be >= 0 (a step of the sample stream)")
    if args.sample_photos and args.step > MAX_PREVIEW_PHOTO_STEP:
        raise UsageError(f"--step {args.step}: at most {MAX_PREVIEW_PHOTO_STEP} with --sample-photos")
    cfg = load_config(args.config, args.overrides)
    if args.sample_photos:
        # Any recipe, without its data or a GPU: the same crops on two bundled photos, on the CPU.
        source = sample_photos(args.images * (args.step + 1))
        cfg.data.backend, cfg.data.device, cfg.data.num_workers = "torchvision", "cpu", 0
    else:
        problems = [f"data.{p}" for p in cfg.data.check_machine()]
        if problems:
            raise ConfigError(problems)
        source = build_source(cfg.data, "train")
    cfg.data.batch_size = min(args.images, len(source))
    batch = next(iter(multicrop_batches(source, cfg.data, seed=cfg.run.seed, rank=0, world_size=1,
                                        start_step=args.step, num_steps=1)))
    sources = [source.load(int(i)) for i in batch.index]
    save_png(crop_grid(batch, cfg.data.augment.mean, cfg.data.augment.std, args.images, sources, source.classes),
             args.output)
    print(f"wrote {args.output}: {len(batch.index)} images x {len(batch.crops)} crops from stream position "
          f"{args.step * cfg.data.batch_size} ({cfg.data.backend} backend"
          + (", scikit-learn's sample photos" if args.sample_photos else "")
          + "); rows are images (the source first), columns crops")
    return 0


def _recipes(args) -> int:
    from sslscale.config.recipes import CONFIGS_DIR, list_recipes
    recipes = list_recipes()
    width = max(len(name) for name, _ in recipes)
    for name, line in recipes:
        print(f"{name:<{width}}  {line}")
    print(f"({len(recipes)} recipes in {os.path.relpath(CONFIGS_DIR)}; `sslscale plan configs/NAME.yaml` says more)")
    return 0


def version_line() -> str:
    import torch

    import sslscale
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"sslscale {sslscale.__version__} (torch {torch.__version__}, {cuda})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslscale", description="Self-supervised pretraining: DISSL, CISSL, "
                                     "SimCLR, DINO; linear probing of frozen trunks.")
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pretrain", help="train a run (or resume it: same command, same run folder)")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100 run.name=try1")
    p.set_defaults(func=_pretrain)

    p = commands.add_parser("plan", help="what a config resolves to: batches, steps, lr, parameters, FLOPs, memory")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for pretrain")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to plan for (default: the config's slurm job shape, nodes x tasks per node)")
    p.add_argument("--dataset-size", type=int, default=None,
                   help="train images, to plan without the data on this machine (default: count them)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--no-flops", action="store_true", help="skip fvcore's FLOP count (it traces the model)")
    p.set_defaults(func=_plan)

    p = commands.add_parser("bench", help="how fast a config trains here: step, data, end to end; MFU, host time")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for pretrain (e.g. data.batch_size=320)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, pipeline start-up)")
    p.add_argument("--only", default=None, help="comma-separated subset of step,data,end_to_end")
    p.add_argument("--json", action="store_true", help="JSON lines only, no table")
    p.set_defaults(func=_bench)

    for name, func, what in (("linear-eval", _linear_eval, "linear probes, kNN and RankMe"),
                             ("knn", _knn, "kNN (and RankMe) alone")):
        p = commands.add_parser(name, help=f"{what} of a run's newest checkpoint or of a trunk file, from a "
                                "feature cache extracted on every rank")
        p.add_argument("target", help="run folder (e.g. checkpoints/quickstart) or trunk file (from `sslscale export` "
                       "or published)")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. eval.linear.epochs=50")
        p.add_argument("--config", default=None, help="for a trunk file: the recipe giving data and eval settings")
        p.add_argument("--out", default=None, help="evaluation folder (default: RUN/eval, or FILE_eval/ beside a "
                       "trunk file)")
        p.set_defaults(func=func)

    p = commands.add_parser("export", help="write the trunk of a run's newest checkpoint as one file (published "
                            "layout, shape recorded)")
    p.add_argument("run_dir")
    p.add_argument("output", help="e.g. resnet50_dissl.pt")
    p.set_defaults(func=_export)

    p = commands.add_parser("verify", help="check every checkpoint of a run against its checksums (no model is "
                            "built); non-zero exit if the newest is bad")
    p.add_argument("run_dir")
    p.set_defaults(func=_verify)

    p = commands.add_parser("prepare-data", help="write an embedded data set as an image folder of JPEGs")
    p.add_argument("source", choices=["fashion_mnist", "digits", "synthetic"])
    p.add_argument("dest", help="folder to create, with train/ and val/ inside")
    p.add_argument("--source-path", default=None, help="where the source's files are (fashion_mnist)")
    p.add_argument("--limit", type=int, default=None, help="write at most this many images per split")
    p.set_defaults(func=_prepare_data)

    p = commands.add_parser("imagenet-val", help="sort ImageNet's flat val folder into class folders")
    p.add_argument("val_dir", help="the folder of ILSVRC2012_val_*.JPEG")
    p.add_argument("labels", help="LOC_val_solution.csv (Kaggle) or a 'file class' list")
    p.add_argument("--train-dir", default=None, help="train/: every class must be one of its folders")
    p.add_argument("--dry-run", action="store_true", help="say what would move, move nothing")
    p.set_defaults(func=_imagenet_val)

    p = commands.add_parser("preview", help="write a PNG of the crops a config feeds the model")
    p.add_argument("config")
    p.add_argument("output", help="e.g. crops.png")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.backend=dali")
    p.add_argument("--images", type=int, default=8, help="rows (images) in the grid")
    p.add_argument("--step", type=int, default=0,
                   help="show stream images step*N .. step*N+N-1 (N = --images) instead of the first N")
    p.add_argument("--sample-photos", action="store_true",
                   help="crop scikit-learn's two sample photos instead of the recipe's data (no data set needed)")
    p.set_defaults(func=_preview)

    p = commands.add_parser("recipes", help="the recipes in configs/, one line each")
    p.set_defaults(func=_recipes)
    return parser


def read_env_or_main() -> bool:
    """Whether this process is rank 0 (launcher variables that make no sense count as rank 0: it must speak)."""
    from sslscale.dist.process_group import read_env
    try:
        return read_env().is_main
    except DistributedSetupError:
        return True


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.sources import ClassMismatch
    from sslscale.checkpoint.disk import EXIT_DISK_ERROR, DiskError
    from sslscale.checkpoint.lock import FolderInUse
    from sslscale.checkpoint.trunk_file import TrunkFileError
    from sslscale.config import ConfigError
    from sslscale.train.loop import TooManyNonFiniteLosses
    from sslscale.train.stop_signals import EXIT_STOPPED_FOR_REQUEUE, StoppedForRequeue
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option (`sslscale knn FILE --config C eval.x=1`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Under torchrun or srun every rank meets the same bad config or checkpoint: rank 0 says it, once.
    is_main = read_env_or_main()
    try:
        return args.func(args)
    except HostUnreachable as error:  # only the rank that cannot resolve the name knows it: each says it
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except (ConfigError, CheckpointMismatch, NoUsableCheckpoint, DistributedSetupError, FileNotFoundError,
            FileExistsError, TrunkFileError, ClassMismatch, FolderInUse, UsageError) as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StoppedForRequeue as stop:
        if is_main:
            print(str(stop), file=sys.stderr)
        return EXIT_STOPPED_FOR_REQUEUE
    except DiskError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DISK_ERROR
    except (TooManyNonFiniteLosses, RankFailure) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
