"""The paper's Table-1 comparison on real small data: DINO vs DISSL and SimCLR vs CISSL, pretrained on
Fashion-MNIST with the same budget per run, probed next to the randomly initialised trunk.

    python benchmarks/table1_study.py                          # 3 seeds, about half an hour per seed on 2 cores
    python benchmarks/table1_study.py --seeds 0 1 2 3 4 --out docs

Each run is `sslscale pretrain configs/fashion_mnist_<objective>.yaml run.seed=S` in its own process: the
same trunk (the quickstart's), data, crops and number of training images (one epoch of the 60,000 train
images, two 28-px crops each), then the quickstart's probes (linear on 20,000 labelled train images, linear
on 10 labels per class, kNN). For a seed every objective starts from the same random trunk, which is probed
once; RankMe of the train features is shown too, a label-free measure. Writes table1_fashion_mnist.md (mean
and standard deviation over seeds), .png (bar plot) and .json
(every run) to --out, with the commit and the machine they came from, and quickstart_results.md: the DISSL
runs are the quickstart (configs/quickstart.yaml under another run name), seed by seed next to the random
trunk. Both tables in README are these files. --from-json renders them again from a .json of an earlier run.
Each run's result is also kept in --results (benchmarks/results/table1/ by default, in the repository): a run
found there is not run again, so a study can be stopped and continued, on another day or machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pairs as the paper compares them: each baseline next to the objective that replaces it.
OBJECTIVES = ("dino", "dissl", "simclr", "cissl")
LABELS = {"dino": "DINO", "dissl": "DISSL", "simclr": "SimCLR", "cissl": "CISSL"}
PROBES = {"linear": "linear, all labels", "linear_10_per_class": "linear, 10 labels per class", "knn": "kNN (k = 20)",
          "rankme": "RankMe (no labels)"}


def score(probe: str, result: dict) -> float:
    """Test top-1 of a probe (final epoch, the sweep point chosen on validation, for linear probes; k = 20 for
    kNN), or the RankMe of the train features."""
    if probe == "rankme":
        return result["value"]
    if probe == "knn":
        return result["by_k"]["20"]["top1"]
    return result["best"]["test"]["top1"]


def run(objective: str, seed: int, root: str, results: str, with_random_init: bool) -> dict:
    """One pretrain + probe, or what an earlier invocation of this script measured for it (a file in
    `results`): a study that was stopped, or spread over several sessions, picks up where it was, and its
    finished runs keep the commit and times they were measured with. Delete a file to measure it again."""
    kept = os.path.join(results, f"{objective}_seed{seed}.json")
    if os.path.exists(kept):
        with open(kept) as f:
            return json.load(f)
    result = pretrain_and_probe(objective, seed, root, with_random_init)
    os.makedirs(results, exist_ok=True)
    with open(kept + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(kept + ".tmp", kept)
    return result


def pretrain_and_probe(objective: str, seed: int, root: str, with_random_init: bool) -> dict:
    config = os.path.join(REPO, "configs", f"fashion_mnist_{objective}.yaml")
    overrides = [f"run.seed={seed}", f"run.root={root}", f"run.name={objective}_seed{seed}",
                 f"eval.compare_random_init={str(with_random_init).lower()}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sslscale.cli", "pretrain", config, *overrides], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{objective} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(root, f"{objective}_seed{seed}", "eval", "linear.json")) as f:
        report = json.load(f)
    probe_seconds = report["seconds"]["total"]
    return {"objective": objective, "seed": seed, "commit": current_commit(), "seconds_total": round(seconds, 1),
            "seconds_pretrain": round(seconds - probe_seconds, 1), "seconds_probe": probe_seconds,
            "results": {trunk: {probe: score(probe, probes[probe]) for probe in PROBES}
                        for trunk, probes in report["results"].items()},
            "label_free_last": report["label_free"]["last"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    """{row name: {probe: (mean, std), "runs": n}} for every objective that has runs and for the random-init
    trunk."""
    rows = {}
    for objective in OBJECTIVES:
        mine = [r for r in runs if r["objective"] == objective]
        if mine:
            rows[LABELS[objective]] = {p: mean_std([r["results"]["pretrained"][p] for r in mine]) for p in PROBES}
            rows[LABELS[objective]]["minutes"] = mean_std([r["seconds_pretrain"] / 60 for r in mine])
            rows[LABELS[objective]]["runs"] = len(mine)
    randoms = [r["results"]["random_init"] for r in runs if "random_init" in r["results"]]
    if randoms:
        rows["random init"] = {p: mean_std([r[p] for r in randoms]) for p in PROBES}
        rows["random init"]["runs"] = len(randoms)
    return rows


def found_runs(results: str, seeds: list[int]) -> list[dict]:
    """The runs of `seeds` already measured (in --results), in the order the study runs them."""
    runs = []
    for seed in seeds:
        for objective in OBJECTIVES:
            path = os.path.join(results, f"{objective}_seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f))
    return runs


def current_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}"


def provenance(runs: list[dict]) -> str:
    """The commit(s) the runs were measured at (a resumed study may span several) and the machine."""
    commits = sorted({r.get("commit", "unknown") for r in runs})
    return (f"{'commit' if len(commits) == 1 else 'commits'} {', '.join(commits)}, {platform.machine()} CPU, "
            f"{os.cpu_count()} cores, no GPU")


def markdown(rows: dict, seeds: list[int], where: str) -> str:
    lines = [f"Fashion-MNIST test top-1 (%) and RankMe, mean ± standard deviation over seeds "
             f"{', '.join(map(str, seeds))}; {where}.", "",
             "| trunk | seeds | " + " | ".join(PROBES.values()) + " | pretraining minutes |",
             "|---" * (len(PROBES) + 3) + "|"]
    for name, row in rows.items():
        cells = [f"{row[p][0]:.1f} ± {row[p][1]:.1f}" if row["runs"] > 1 else f"{row[p][0]:.1f}" for p in PROBES]
        minutes = f"{row['minutes'][0]:.1f}" if "minutes" in row else "-"
        lines.append(f"| {name} | {row['runs']} | " + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines)


def quickstart_markdown(runs: list[dict], where: str) -> str:
    """README's quickstart table: every seed of the DISSL runs (the quickstart config) next to the same trunk at
    its random initialisation."""
    randoms = {r["seed"]: r["results"]["random_init"] for r in runs if "random_init" in r["results"]}
    lines = [f"Measured by `python benchmarks/table1_study.py` ({where}).", "",
             "| probe (test top-1, %) | seed | pretrained | random init | gain |", "|---|---|---|---|---|"]
    for probe in ("linear", "linear_10_per_class", "knn"):
        for i, run in enumerate(r for r in runs if r["objective"] == "dissl" and r["seed"] in randoms):
            mine, random = run["results"]["pretrained"][probe], randoms[run["seed"]][probe]
            lines.append(f"| {PROBES[probe] if i == 0 else ''} | {run['seed']} | {mine:.1f} | {random:.1f} | "
                         f"{mine - random:+.1f} |")
    minutes = [r["seconds_pretrain"] / 60 for r in runs if r["objective"] == "dissl" and r["seed"] in randoms]
    span = f"{min(minutes):.1f}" if len(minutes) == 1 else f"{min(minutes):.1f}-{max(minutes):.1f}"
    lines += ["", f"Pretraining took {span} minutes per seed on that machine."]
    return "\n".join(lines)


def write_outputs(runs: list[dict], seeds: list[int], where: str, out: str) -> str:
    rows = summarise(runs)
    table = markdown(rows, seeds, where)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table1_fashion_mnist.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "quickstart_results.md"), "w") as f:
        f.write(quickstart_markdown(runs, where) + "\n")
    bar_plot(rows, seeds, where, os.path.join(out, "table1_fashion_mnist.png"))
    return table


def bar_plot(rows: dict, seeds: list[int], where: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    colours = {"DINO": "#9ecae1", "DISSL": "#08519c", "SimCLR": "#fdae6b", "CISSL": "#d94801",
               "random init": "#bdbdbd"}
    fig, axes = plt.subplots(1, len(PROBES), figsize=(15, 3.8))
    for ax, (probe, title) in zip(axes, PROBES.items()):
        means = [rows[n][probe][0] for n in names]
        stds = [rows[n][probe][1] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[colours[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0, low - 5), max(m + s for m, s in zip(means, stds)) + 2)
        ax.set_title(title)
        ax.set_ylabel("effective rank" if probe == "rankme" else "test top-1 (%)")
    fig.suptitle(f"Fashion-MNIST, one epoch of pretraining each, seeds {', '.join(map(str, seeds))} "
                 f"(mean ± std); {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=os.path.join(REPO, "checkpoints", "table1_study"),
                        help="where the run folders go")
    parser.add_argument("--out", default=os.path.join(REPO, "docs"), help="where the table and the plot go")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "table1"),
                        help="each run's result, <objective>_seed<S>.json; runs found there are not run again")
    parser.add_argument("--so-far", action="store_true", help="render the tables and the plot from the runs of "
                        "--seeds found in --results, without training (a study still under way)")
    parser.add_argument("--from-json", default=None, help="render the tables and the plot from this .json of an "
                        "earlier run instead of training")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(write_outputs(saved["runs"], saved["seeds"], saved["provenance"], args.out))
        return
    if args.so_far:
        runs = found_runs(args.results, args.seeds)
        print(write_outputs(runs, sorted({r["seed"] for r in runs}), provenance(runs), args.out))
        return
    if len(args.seeds) < 2:
        parser.error("--seeds: give at least two, the table reports a standard deviation")
    runs = []
    for seed in args.seeds:
        for i, objective in enumerate(OBJECTIVES):
            result = run(objective, seed, args.root, args.results, with_random_init=(i == 0))
            runs.append(result)
            print(f"seed {seed} {objective}: " + ", ".join(f"{p} {v:.1f}" for p, v in
                                                          result["results"]["pretrained"].items())
                  + f" ({result['seconds_pretrain']:.0f} s pretraining)", flush=True)
    where = provenance(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table1_fashion_mnist.json"), "w") as f:
        json.dump({"provenance": where, "seeds": args.seeds, "runs": runs}, f, indent=2)
    print(write_outputs(runs, args.seeds, where, args.out))


if __name__ == "__main__":
    main()
