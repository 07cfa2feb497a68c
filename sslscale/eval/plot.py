"""A picture of the linear probes: test top-1 of every sweep point, one bar per label budget, for each
evaluated network (columns) and feature set (rows); a tick marks validation top-1, a star the point
chosen on validation."""
from __future__ import annotations

import os


def _feature_sets(result: dict) -> dict[str, dict]:
    sets = {"trunk": result}
    sets.update(result.get("layers", {}))
    return sets


def plot_sweep(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    set_names = list(_feature_sets(results[names[0]]))
    figure, axes = plt.subplots(len(set_names), len(names), figsize=(4.8 * len(names), 3.2 * len(set_names)),
                                squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10").colors
    values = [p[split]["top1"] for name in names for results_of_set in _feature_sets(results[name]).values()
              for key, entry in results_of_set.items() if key.startswith("linear")
              for p in entry["points"] for split in ("val", "test")]
    limits = (max(0.0, min(values, default=0) - 10), min(100.0, max(values, default=100) + 5))  # shared y axis
    for column, name in enumerate(names):
        for row, set_name in enumerate(set_names):
            axis = axes[row][column]
            budgets = {k: v for k, v in _feature_sets(results[name])[set_name].items() if k.startswith("linear")}
            if not budgets:
                axis.set_visible(False)
                continue
            points = next(iter(budgets.values()))["points"]
            width = 0.8 / len(budgets)
            for b, (budget, entry) in enumerate(budgets.items()):
                xs = [i - 0.4 + width * (b + 0.5) for i in range(len(entry["points"]))]
                tests = [p["test"]["top1"] for p in entry["points"]]
                label = "all labels" if budget == "linear" else budget.removeprefix("linear_").replace("_", " ")
                axis.bar(xs, tests, width, color=colours[b % 10], label=label)
                axis.scatter(xs, [p["val"]["top1"] for p in entry["points"]], marker="_", color="black", s=60,
                             zorder=3, label="validation" if b == 0 else None)
                best = entry["points"].index(entry["best"])
                axis.scatter([xs[best]], [tests[best] + 1.5], marker="*", color="black", s=60, zorder=3,
                             label="chosen on validation" if b == 0 else None)
            axis.set_xticks(range(len(points)))
            axis.set_xticklabels([f"{p['base_lr']:g}\n{p['weight_decay']:g}" for p in points], fontsize=7)
            axis.set_xlabel("base lr / weight decay", fontsize=8)
            axis.set_ylim(*limits)
            axis.set_title(f"{name}: {set_name}", fontsize=9)
            axis.grid(axis="y", alpha=0.3)
            if column == 0:
                axis.set_ylabel("test top-1 (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle(f"linear probe per sweep point: {os.path.basename(str(report['target']))}", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path + ".partial"
    figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    os.replace(tmp, path)
