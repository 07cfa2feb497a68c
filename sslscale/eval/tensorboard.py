"""The evaluation's results in the run's TensorBoard, beside the training curves: every probe's test top-1
and RankMe, at the step of the checkpoint they evaluate."""
from __future__ import annotations

import os

from sslscale.train.monitor import summary_writer


def scalars_of(report: dict) -> dict[str, float]:
    """eval/<trunk>/<probe> -> value: linear probes (the point chosen on validation), kNN per k, RankMe."""
    scalars = {}
    for trunk, probes in report["results"].items():
        for name, result in probes.items():
            if name.startswith("linear"):
                scalars[f"eval/{trunk}/{name}_top1"] = result["best"]["test"]["top1"]
            elif name == "knn":
                for k, accuracy in result["by_k"].items():
                    scalars[f"eval/{trunk}/knn_k{k}_top1"] = accuracy["top1"]
            elif name == "rankme":
                scalars[f"eval/{trunk}/rankme"] = result["value"]
    return scalars


def log_report(report: dict, run_dir: str) -> None:
    writer = summary_writer(os.path.join(run_dir, "tb"))
    if writer is None:
        return
    with writer:
        for tag, value in scalars_of(report).items():
            writer.add_scalar(tag, value, report.get("step", 0))
        writer.add_text("eval/protocol", report["protocol"], report.get("step", 0))
