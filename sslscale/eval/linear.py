"""Linear probes on frozen features (METHOD section 7): every sweep point, label budget and layer in one pass.

A *head group* is all (base lr, weight decay) points of one feature set (the trunk output or another
layer) and one fit set (all train rows but the validation split, or a few labels per class). Its
heads are one weight tensor [d, points x classes]: a batch costs one matmul for every point (and one
for the gradients, which have a closed form on frozen features), and each point keeps its own lr and
weight decay in a vectorised SGD (momentum 0.9, weight decay on weight and bias, exactly
torch.optim.SGD's update). Groups sharing a fit set read the same batch
rows, so one read of the features feeds every head. Every point starts from the same seeded
Linear(d, classes) initialisation and sees the same seeded batch order, so each point trains as it
would alone.

What the heads see (eval.linear.norm): standardize (mean / std of the fit rows: an affine map, so
the probe stays linear in z), batchnorm (BatchNorm1d(affine=False) in training mode, running
statistics at test time: the authors' probe) or none. The point is chosen on the validation split
carved from train; the reported numbers are final-epoch top-1 / top-5 on the test split.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MOMENTUM = 0.9
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


def split_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), a seeded random split."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(labels))))
    return order[n_val:], order[:n_val]


def per_class_subset(labels: torch.Tensor, indices: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """`per_class` indices of each class, drawn (seeded) from `indices`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels[indices].unique():
        members = indices[labels[indices] == c]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen)


class FeatureSource:
    """Rows of the cached features on the probe's device: from a resident copy (index_select) or read
    from the memory-mapped cache batch by batch."""

    def __init__(self, split, name: str, device: torch.device, resident: bool, chunk_rows: int):
        self.split, self.name, self.device, self.chunk_rows = split, name, device, chunk_rows
        self.table = split.load(name, device) if resident else None

    @property
    def dim(self) -> int:
        return self.split.dim(self.name)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 rows on the device."""
        if self.table is not None:
            return self.table.index_select(0, index.to(self.device)).float()
        return self.split.rows(self.name, index).to(self.device, non_blocking=True).float()

    def chunks(self, index: torch.Tensor):
        for start in range(0, len(index), self.chunk_rows):
            yield self.rows(index[start:start + self.chunk_rows])


@dataclass
class HeadGroup:
    """The sweep points of one (feature set, fit set)."""

    features: FeatureSource
    budget: str  # "all" or "N_per_class"
    fit: torch.Tensor  # row indices of the train split
    base_lrs: list[float]
    weight_decays: list[float]
    norm: str
    num_classes: int
    compute_dtype: torch.dtype = torch.float32  # of the matmuls; weights, gradients and updates stay fp32
    weight: torch.Tensor = field(init=False)  # [d, P, C]
    bias: torch.Tensor = field(init=False)  # [P, C]

    def init(self, seed: int, batch_size: int) -> None:
        device, d, c = self.features.device, self.features.dim, self.num_classes
        points = len(self.base_lrs)
        with torch.random.fork_rng(devices=[]):  # the same start as a lone nn.Linear under manual_seed(seed)
            torch.manual_seed(seed)
            start = torch.nn.Linear(d, c)
        self.weight = start.weight.detach().T.unsqueeze(1).repeat(1, points, 1).to(device)
        self.bias = start.bias.detach().unsqueeze(0).repeat(points, 1).to(device)
        self.momentum = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]
        self.lr = torch.tensor(self.base_lrs, device=device) * batch_size / 256
        self.decay = torch.tensor(self.weight_decays, device=device)
        self.mean = torch.zeros(d, device=device)
        self.std = torch.ones(d, device=device)
        self.running_mean, self.running_var = torch.zeros(d, device=device), torch.ones(d, device=device)
        if self.norm == "standardize":
            self._fit_statistics()

    def _fit_statistics(self) -> None:
        """Mean and (unbiased) std of the fit rows, streamed in float64."""
        total = torch.zeros(self.features.dim, dtype=torch.float64, device=self.features.device)
        squares = torch.zeros_like(total)
        for chunk in self.features.chunks(self.fit):
            total += chunk.double().sum(0)
            squares += chunk.double().square().sum(0)
        n = len(self.fit)
        mean = total / n
        var = (squares - n * mean.square()) / max(n - 1, 1)
        self.mean, self.std = mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-6)

    def normalise(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.norm == "standardize":
            return (x - self.mean) / self.std
        if self.norm == "batchnorm":
            return F.batch_norm(x, self.running_mean, self.running_var, training=training and len(x) > 1,
                                momentum=BN_MOMENTUM, eps=BN_EPS)
        return x

    def logits(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """[B, P, C] float32 scores of every point."""
        return self._scores(self.normalise(x, training))

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, schedule: float) -> None:
        """One SGD step of every point on the batch (x, y); schedule: the cosine factor of this step.

        Each point minimises its own mean cross-entropy. The features are frozen, so the gradients have
        a closed form: d loss / d scores = (softmax - one-hot) / B, then one matmul for all weights."""
        inputs = self.normalise(x, training=True)
        d_scores = self._scores(inputs).softmax(dim=2)
        d_scores.scatter_add_(2, y.view(-1, 1, 1).expand(-1, d_scores.shape[1], 1),
                              torch.full((len(y), d_scores.shape[1], 1), -1.0, device=d_scores.device))
        d_scores /= len(y)
        d, points, c = self.weight.shape
        weight_grad = (inputs.T.to(self.compute_dtype) @ d_scores.view(len(y), points * c).to(self.compute_dtype))
        weight_grad = weight_grad.float().view(d, points, c)
        bias_grad = d_scores.sum(0)
        lr = self.lr * schedule
        for param, grad, buffer, shape in ((self.weight, weight_grad, self.momentum[0], (1, -1, 1)),
                                           (self.bias, bias_grad, self.momentum[1], (-1, 1))):
            grad += self.decay.view(shape) * param  # torch.optim.SGD: d_p = grad + wd * p
            buffer.mul_(MOMENTUM).add_(grad)  # buf = momentum * buf + d_p (buf starts at d_p)
            param.sub_(lr.view(shape) * buffer)

    def _scores(self, normalised: torch.Tensor) -> torch.Tensor:
        """The matmul in compute_dtype (bf16 on GPUs), accumulated and returned in fp32."""
        d, points, c = self.weight.shape
        product = normalised.to(self.compute_dtype) @ self.weight.view(d, points * c).to(self.compute_dtype)
        return product.float().view(-1, points, c) + self.bias

    @torch.no_grad()
    def accuracy(self, source: FeatureSource, index: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        """Top-1 / top-5 (%) of every point on the rows `index` of `source`."""
        top5 = min(5, self.num_classes)
        correct = torch.zeros(2, self.weight.shape[1], device=self.weight.device)
        for start in range(0, len(index), source.chunk_rows):
            x = source.rows(index[start:start + source.chunk_rows])
            y = labels[index[start:start + source.chunk_rows]].to(self.weight.device)
            ranked = self.logits(x, training=False).topk(top5, dim=2).indices  # [B, P, 5]
            hits = ranked == y.view(-1, 1, 1)
            correct[0] += hits[:, :, 0].sum(0)
            correct[1] += hits.any(dim=2).sum(0)
        values = (100 * correct / max(len(index), 1)).tolist()
        return [{"top1": values[0][p], f"top{top5}": values[1][p]} for p in range(len(values[0]))]


class EpochBatches:
    """Seeded batches of positions in a fit set: one permutation per epoch, the last batch of an epoch
    possibly smaller (as `for start in range(0, n, batch)`)."""

    def __init__(self, n: int, batch_size: int, epochs: int, seed: int):
        self.n, self.batch_size, self.epochs = n, min(batch_size, n), epochs
        self.generator = torch.Generator().manual_seed(seed)
        self.per_epoch = math.ceil(n / self.batch_size)
        self.total = epochs * self.per_epoch

    def __iter__(self):
        for _ in range(self.epochs):
            order = torch.randperm(self.n, generator=self.generator)
            for start in range(0, self.n, self.batch_size):
                yield order[start:start + self.batch_size]


@contextlib.contextmanager
def flush_denormals():
    """Softmax probabilities of confident heads (large lr) fall below float32's normal range, and x86 CPUs
    compute on such denormal numbers up to 100x slower: a 12-point sweep measured 12.8 ms per step with
    them, 3.2 ms flushed to zero (a change below 1e-38 in any gradient). GPUs flush them in hardware."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def train_groups(groups: list[HeadGroup], train_labels: torch.Tensor, *, epochs: int, batch_size: int, seed: int,
                 progress=None) -> None:
    """Trains every group to the end of its own schedule in one interleaved pass: at each step, each fit
    set still running draws its batch and every group on that fit set steps on it."""
    by_fit: dict[str, list[HeadGroup]] = {}
    for group in groups:
        by_fit.setdefault(group.budget, []).append(group)
    runs = []
    for budget, members in by_fit.items():
        batches = EpochBatches(len(members[0].fit), batch_size, epochs, seed)
        for group in members:
            group.init(seed, batches.batch_size)
        runs.append((members, batches, iter(batches)))
    longest = max(batches.total for _, batches, _ in runs)
    device = groups[0].features.device
    labels = train_labels.to(device)
    with flush_denormals():
        for step in range(longest):
            for members, batches, order in runs:
                if step >= batches.total:
                    continue
                positions = next(order)
                rows = members[0].fit[positions]
                y = labels[rows.to(device)]
                for group in members:
                    group.step(group.features.rows(rows), y, cosine(step, batches.total))
            if progress is not None:
                progress(step + 1, longest)
