"""ImageNet's validation images ship in one flat folder; the folder source wants one folder per class, as
train has. This moves each image into the folder of its class, from either of the two label files people
have: Kaggle's LOC_val_solution.csv ("ImageId,PredictionString", the class first in the string) or a plain
"file class" list (one pair per line)."""
from __future__ import annotations

import csv
import os

IMAGE_SUFFIX = ".JPEG"


def read_labels(path: str) -> dict[str, str]:
    """{image file name: class folder name (the WordNet id, e.g. n01440764)}."""
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.startswith("ImageId,"):
            rows = csv.DictReader(f)
            labels = {row["ImageId"] + IMAGE_SUFFIX: row["PredictionString"].split()[0] for row in rows}
        else:
            labels = {}
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{path}:{number}: expected 'file class', got {line.strip()!r}")
                labels[os.path.basename(parts[0])] = parts[1]
    if not labels:
        raise ValueError(f"{path} lists no images")
    return labels


def sort_into_class_folders(val_dir: str, labels: dict[str, str], train_classes: list[str] | None = None,
                            dry_run: bool = False) -> dict[str, int]:
    """Moves VAL/<file> to VAL/<class>/<file> for every listed file; files already in place count as done.
    Checks first, moves nothing on a problem: every image in the folder listed, every class one of train's."""
    loose = sorted(e.name for e in os.scandir(val_dir) if e.is_file())
    unlisted = [name for name in loose if name not in labels]
    if unlisted:
        raise ValueError(f"{len(unlisted)} images in {val_dir} are not in the label file, e.g. {unlisted[:3]}")
    if train_classes is not None:
        unknown = sorted(set(labels.values()) - set(train_classes))
        if unknown:
            raise ValueError(f"{len(unknown)} classes of the label file are not class folders of train, e.g. "
                             f"{unknown[:3]}")
    counts = {"moved": 0, "in_place": 0, "missing": 0}
    for name, label in labels.items():
        source, target = os.path.join(val_dir, name), os.path.join(val_dir, label, name)
        if os.path.exists(target):
            counts["in_place"] += 1
        elif not os.path.exists(source):
            counts["missing"] += 1
        else:
            counts["moved"] += 1
            if not dry_run:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
    return counts
