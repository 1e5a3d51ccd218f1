"""Distillation losses: the Child (and retrained 1-bit nets) learn from a real-valued teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_ce(logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Batch mean of -sum_n p_n log q_n (the retraining repo's DistributionLoss, temperature 1)."""
    return -(teacher_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def kl_to_teacher(logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Batch mean KL(p || softmax(logits)) = -G of Eq. 4.30 (soft_target_ce minus the constant H(p))."""
    return soft_target_ce(logits, teacher_probs) + torch.xlogy(teacher_probs, teacher_probs).sum(-1).mean()
