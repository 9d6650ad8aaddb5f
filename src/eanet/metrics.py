"""Loss, top-1/top-5 and confusion counts on tensors: torch only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Metrics:
    """Mean loss and accuracies over `count` images (fractions, not percent)."""

    loss: float
    top1: float
    top5: float
    count: int


class MetricSums:
    """Running sums on the device; reading them is the only host sync."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Add a batch: `loss` is the batch mean."""
        n = labels.numel()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk == labels[:, None]
        self.loss += loss.detach().double() * n
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.count += n

    def result(self) -> Metrics:
        n = max(self.count, 1)
        return Metrics(self.loss.item() / n, self.top1.item() / n, self.top5.item() / n, self.count)


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1
) -> Metrics:
    """Mean label-smoothed loss, top-1 and top-5 of a set's logits (count 0 when empty)."""
    sums = MetricSums(logits.device)
    if len(labels):
        labels = labels.to(logits.device)
        sums.add(logits, labels, F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    return sums.result()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts, true class per row."""
    flat = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
