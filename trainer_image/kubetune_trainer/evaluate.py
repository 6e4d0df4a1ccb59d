"""Evaluation: loss, top-1, top-5 and the confusion matrix over a strided shard of the validation set,
summed across ranks; the report built from them (per-class precision, recall, accuracy); optionally a few
misclassified samples (for TensorBoard's image grid); and what an evaluation means for checkpoint.best and
training.earlyStopping (pure functions of the checkpointed metrics, so a resume decides the same)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from kubetune_trainer import data as data_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.config import BestConfig, EarlyStoppingConfig
from kubetune_trainer.runtime import Runtime


class Sample(NamedTuple):
    image: torch.Tensor
    predicted: int
    target: int


@dataclass
class Misclassified:
    """Up to `limit` validation samples of this rank's shard the model got wrong, spread over the true
    classes (at most limit/classes per class while others are wrong too), chosen in evaluation order, so
    the same weights give the same samples. Inputs as the model saw them (normalised, float32, on the
    CPU). A limit of 0 collects nothing and costs nothing."""

    limit: int = 0
    chosen: list[Sample] = field(default_factory=list)
    spare: list[Sample] = field(default_factory=list)
    per_class: dict[int, int] = field(default_factory=dict)

    def add(self, x: torch.Tensor, predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
        if len(self.chosen) >= self.limit:
            return
        quota = math.ceil(self.limit / max(1, num_classes))
        wrong = (predicted != target).nonzero().flatten()
        for i, p, t in zip(wrong.tolist(), predicted[wrong].tolist(), target[wrong].tolist(), strict=True):
            if self.per_class.get(t, 0) < quota:
                self.per_class[t] = self.per_class.get(t, 0) + 1
                self.chosen.append(Sample(x[i].detach().float().cpu(), p, t))
                if len(self.chosen) >= self.limit:
                    return
            elif len(self.spare) < self.limit - len(self.chosen):
                self.spare.append(Sample(x[i].detach().float().cpu(), p, t))

    def samples(self) -> list[Sample]:
        """The chosen samples, topped up from the rest when few classes had errors; by true class."""
        picked = (self.chosen + self.spare)[: self.limit]
        return sorted(picked, key=lambda s: s.target)


@dataclass(frozen=True)
class EvalReport:
    """One evaluation: the same numbers on every rank. `confusion[t][p]` counts samples of true class t
    the model predicted as p (rows: truth, columns: prediction)."""

    loss: float
    top1: float
    top5: float
    top_k: int
    """The k of top5: 5, or the class count when there are fewer classes."""
    count: int
    classes: list[str]
    confusion: list[list[int]] | None
    """None above CONFUSION_MAX_CLASSES classes (the per-class numbers are still there)."""
    per_class: list[dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        """The telemetry keys: eval_loss, eval_top1, eval_top5."""
        return {"eval_loss": self.loss, "eval_top1": self.top1, "eval_top5": self.top5}

    def to_doc(self, step: int, epoch: int) -> dict[str, Any]:
        """eval/step-N.json."""
        return {
            "step": step,
            "epoch": epoch,
            "count": self.count,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "topK": self.top_k,
            "classes": self.classes,
            "perClass": self.per_class,
            "confusion": self.confusion,
        }


CONFUSION_MAX_CLASSES = 1000
"""Up to this many classes the report has the full confusion matrix (1000: a million counts)."""


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def build_report(
    confusion: list[list[int]], loss_sum: float, top5_correct: int, top_k: int, classes: list[str]
) -> EvalReport:
    """The report of a square confusion matrix (counts, rows: truth) plus the summed loss and top-k hits.

    Per class: precision = right / predicted as it, recall = right / samples of it, accuracy = one-vs-rest
    (samples whose membership of the class was judged right / all samples); None where the denominator is
    0 (precision of a class never predicted, recall of a class absent from the split). Classes beyond
    `classes` (a classifier larger than the data's class list) are named by their index."""
    n_cls = len(confusion)
    right = [confusion[i][i] for i in range(n_cls)]
    support = [sum(row) for row in confusion]
    predicted = [sum(row[i] for row in confusion) for i in range(n_cls)]
    report = report_of_counts(right, support, predicted, loss_sum, top5_correct, top_k, classes)
    return dataclasses.replace(report, confusion=confusion)


def report_of_counts(
    right: list[int],
    support: list[int],
    predicted: list[int],
    loss_sum: float,
    top5_correct: int,
    top_k: int,
    classes: list[str],
) -> EvalReport:
    """build_report from per-class counts (right, samples, predictions), without the confusion matrix."""
    total = sum(support)
    names = [classes[i] if i < len(classes) else str(i) for i in range(len(support))]
    per_class = [
        {
            "class": name,
            "support": sup,
            "predicted": pred,
            "precision": _ratio(tp, pred),
            "recall": _ratio(tp, sup),
            "accuracy": _ratio(total - sup - pred + 2 * tp, total),  # (tp + tn) / total
        }
        for name, tp, sup, pred in zip(names, right, support, predicted, strict=True)
    ]
    n = max(1, total)
    return EvalReport(
        loss=loss_sum / n,
        top1=sum(right) / n,
        top5=top5_correct / n,
        top_k=top_k,
        count=total,
        classes=names,
        confusion=None,
        per_class=per_class,
    )


@torch.no_grad()
def evaluate(
    net: nn.Module,
    dataset: Dataset[Any],
    rt: Runtime,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    classes: list[str] | None = None,
    misclassified: Misclassified | None = None,
    channels_last: bool = False,
) -> EvalReport:
    """Evaluate `net` on this rank's shard; every rank gets the same report. Leaves `net` in eval mode.

    The loss is plain cross-entropy whatever the training criterion (mixup, label smoothing), so evaluations
    of different specs compare. `misclassified` (optional) collects up to its limit of wrongly classified
    samples of this rank."""
    net.eval()
    device = torch.device(rt.device)
    idx = data_mod.eval_indices(len(dataset), rt.rank, rt.world_size)  # type: ignore[arg-type]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    loader = data_mod.make_loader(dataset, batches, num_workers, 0)  # type: ignore[arg-type]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-k hits
    # Every rank knows the class count before the first batch (a shard may be empty).
    n_cls = _num_outputs(net)
    k = min(5, n_cls)
    full = n_cls <= CONFUSION_MAX_CLASSES
    # The confusion matrix flattened (truth * classes + prediction), or right/samples/predicted per class.
    counts = torch.zeros(n_cls * n_cls if full else 3 * n_cls, dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        x = x.contiguous(memory_format=model_mod.memory_format(channels_last))  # as training.channelsLast
        with autocast():
            out = net(x)
        sums[0] += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        top = out.topk(k, dim=1).indices
        sums[1] += (top == y[:, None]).any(dim=1).sum()
        pred = top[:, 0]
        # bincount without weights is deterministic on CUDA too
        if full:
            counts += torch.bincount(y * n_cls + pred, minlength=n_cls * n_cls)
        else:
            counts += torch.cat([torch.bincount(v, minlength=n_cls) for v in (y[pred == y], y, pred)])
        if misclassified is not None:
            misclassified.add(x, pred, y, n_cls)
    if rt.distributed:
        # One all-reduce of everything; float64 holds counts exactly up to 2**53.
        box = torch.cat([sums, counts.double()])
        dist.all_reduce(box)
        sums, counts = box[:2], box[2:].round().long()
    loss_sum, hits, names = float(sums[0]), round(float(sums[1])), list(classes or [])
    if full:
        return build_report(counts.view(n_cls, n_cls).cpu().tolist(), loss_sum, hits, k, names)
    right, support, predicted = counts.view(3, n_cls).cpu().tolist()
    return report_of_counts(right, support, predicted, loss_sum, hits, k, names)


def _num_outputs(net: nn.Module) -> int:
    """The classifier's size: timm models say it (num_classes); others by one forward pass is too costly,
    so the last Linear's out_features."""
    n = getattr(net, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot tell the class count of the evaluated model (no num_classes, no Linear)")
    return int(linears[-1].out_features)


# -- checkpoint.best and training.earlyStopping -----------------------------------------------------------


def metric_value(report: EvalReport, metric: str) -> float:
    """top1 | top5 | loss of a report."""
    return float({"top1": report.top1, "top5": report.top5, "loss": report.loss}[metric])


def best_mode(metric: str, mode: str | None) -> str:
    """checkpoint.best.mode resolved: min for loss, max otherwise, unless set."""
    return mode or ("min" if metric == "loss" else "max")


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (any finite value beats no best; NaN or inf,
    e.g. a diverged fp16 run's loss, never improves, so it can neither become the best nor pin it)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value - min_delta > best if mode == "max" else value + min_delta < best


# Keys of the trainer's checkpointed metrics (Trainer.metrics) this section keeps.
BEST_METRIC, BEST_NAME, BEST_STEP = "best_metric", "best_metric_name", "best_step"
STOP_BEST, STOP_BEST_STEP = "early_stopping_best", "early_stopping_best_step"
STALE_EVALS = "early_stopping_stale_evals"
"""Evaluations since the watched metric last improved by more than minDelta."""


def record(
    metrics: dict[str, Any],
    report: EvalReport,
    step: int,
    best: BestConfig | None,
    stop: EarlyStoppingConfig | None,
) -> bool:
    """Fold one evaluation into the checkpointed `metrics`: the best so far (checkpoint.best) and the
    early-stopping counter. True when the evaluated model is the new best, to be exported to best/."""
    new_best = False
    if best is not None:
        value = metric_value(report, best.metric)
        if improves(value, metrics.get(BEST_METRIC), best_mode(best.metric, best.mode)):
            metrics.update({BEST_METRIC: value, BEST_NAME: best.metric, BEST_STEP: step})
            new_best = True
    if stop is not None:
        value = metric_value(report, stop.metric)
        mode = best_mode(stop.metric, None)
        if improves(value, metrics.get(STOP_BEST), mode, stop.minDelta):
            metrics.update({STOP_BEST: value, STOP_BEST_STEP: step, STALE_EVALS: 0})
        else:
            metrics[STALE_EVALS] = int(metrics.get(STALE_EVALS, 0)) + 1
    return new_best


def early_stop_reached(metrics: Mapping[str, Any], stop: EarlyStoppingConfig | None) -> bool:
    """training.earlyStopping's patience is used up (a function of the checkpointed metrics)."""
    return stop is not None and int(metrics.get(STALE_EVALS, 0)) >= stop.patience


def early_stop_reason(metrics: Mapping[str, Any], stop: EarlyStoppingConfig) -> str:
    """Why the run stopped early, for the termination message."""
    delta = f" by more than {stop.minDelta:g}" if stop.minDelta else ""
    return (
        f"eval {stop.metric} did not improve{delta} in {int(metrics.get(STALE_EVALS, 0))} evaluation(s) "
        f"(training.earlyStopping.patience {stop.patience}; best {float(metrics[STOP_BEST]):.4f} at step "
        f"{int(metrics[STOP_BEST_STEP])})"
    )
