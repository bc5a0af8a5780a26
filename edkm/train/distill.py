"""Knowledge distillation from the uncompressed model during DKM fine-tuning.

With ``TrainConfig.distill = a > 0`` each micro-batch's loss is
``(1 - a) * cross_entropy(labels) + a * KL(teacher || student)``, the KL taken per token over
the vocabulary between the next-token distributions of a frozen copy of the original model
(the teacher) and the palettized model. A small text is a weak signal on its own: the labels
give one token per position, the teacher a whole distribution, and matching it holds the
student to what the original model does instead of to the training text (which a few passes
over a small corpus memorize).

The teacher is a second copy of the model's weights on the training device: for a 7B model
on one GPU that is 13.5 GB more in bf16, so ``recipes/llama7b_3bit.yaml`` leaves it off.

Example:
    >>> import torch
    >>> logits = torch.randn(2, 5, 11)
    >>> float(distill_loss(logits, logits))
    0.0
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over token positions of ``KL(softmax(teacher) || softmax(student))``, in fp32.

    Both tensors are ``(..., vocab)`` logits of the same positions; the result is a scalar
    with gradients to ``student_logits`` only.

    Example:
        >>> import torch
        >>> s, t = torch.zeros(1, 3, 4), torch.tensor([[[2.0, 0.0, 0.0, 0.0]] * 3])
        >>> round(float(distill_loss(s, t)), 4)
        0.468
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float().reshape(-1, vocab), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` in eval mode (call before ``edkm.palettize_``).

    Example:
        >>> import torch
        >>> teacher = make_teacher(torch.nn.Linear(2, 2))
        >>> teacher.training, any(p.requires_grad for p in teacher.parameters())
        (False, False)
    """
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
