"""training.mixup: timm's Mixup/CutMix with exact randomness, and the training criterion that goes with it.

timm's Mixup draws from the global numpy RNG (the lambda, the mixup-or-cutmix choice, the CutMix box).
Here each call runs with the global RNGs seeded from (seed, step, micro-batch, rank) and restored after
(data.seeded_rngs), so the mixed batch is a pure function of those and the batch: a resumed run mixes
exactly as an uninterrupted one, and nothing else's random streams move.
"""

from __future__ import annotations

import torch
from torch import nn

from kubetune_trainer.config import MixupConfig, TrainingConfig
from kubetune_trainer.data import derived_seed, seeded_rngs


class Mixer:
    """Mixes a micro-batch's (x, y) into (mixed x, soft targets) for SoftTargetCrossEntropy.

    From training.mixup.offEpoch on, x is left alone and the targets are the label-smoothed one-hots (the
    same loss as cross-entropy with label smoothing), so the criterion need not change mid-run.
    """

    def __init__(
        self, cfg: MixupConfig, num_classes: int, label_smoothing: float, seed: int, rank: int
    ) -> None:
        from timm.data import Mixup

        self.cfg, self.seed, self.rank = cfg, seed, rank
        self._mixup = Mixup(
            mixup_alpha=cfg.mixupAlpha,
            cutmix_alpha=cfg.cutmixAlpha,
            cutmix_minmax=list(cfg.cutmixMinmax) if cfg.cutmixMinmax else None,
            prob=cfg.prob,
            switch_prob=cfg.switchProb,
            mode=cfg.mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def active(self, epoch: int) -> bool:
        """Whether mixup/cutmix is applied in `epoch` (0-based)."""
        return not self.cfg.offEpoch or epoch < self.cfg.offEpoch

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, step: int, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x mixed in place, soft targets) of micro-batch `micro` of step `step` on this rank."""
        self._mixup.mixup_enabled = self.active(epoch)
        with seeded_rngs(derived_seed("mixup", self.seed, step, micro, self.rank)):
            mixed, target = self._mixup(x, y)
        return mixed, target


def build_mixer(t: TrainingConfig, num_classes: int, rank: int) -> Mixer | None:
    """The Mixer for training.mixup (labelSmoothing folded into its targets); None when it is unset."""
    if t.mixup is None:
        return None
    return Mixer(t.mixup, num_classes, t.labelSmoothing, t.seed, rank)


def training_criterion(t: TrainingConfig) -> nn.Module:
    """The training loss: SoftTargetCrossEntropy on the Mixer's soft targets with training.mixup, else
    cross-entropy with training.labelSmoothing. Evaluation always uses plain cross-entropy."""
    if t.mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=t.labelSmoothing)
