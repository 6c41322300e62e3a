"""Distillation losses between the student's and the teacher's final samples: LPIPS (the paper's), L2, SSIM, PSNR.

Inputs are images in [-1, 1], (B, C, H, W). `make_loss(name)` returns a callable giving one scalar.
"""

from __future__ import annotations

from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

LOSSES = ("lpips", "l2", "ssim", "psnr")
# How a schedule is judged on the validation conditions (the start kept, the best epoch, the refinement's swaps):
# `l2`, the mean squared error (led by the worst samples), or `log_l2`, the mean per-sample 10 log10 of it in dB
# (minus the evaluation's mean PSNR, up to a constant: every sample counts alike), or `both`: starts and epochs by
# L2, and a swap of the refinement kept only if it lowers both.
JUDGE_PARTS = {"l2": ("l2",), "log_l2": ("log_l2",), "both": ("l2", "log_l2")}
JUDGE_FLOORS = {"l2": 0.0, "log_l2": -120.0}  # the least a sample can score under each (10 log10 of 1e-12)
_LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                         "squeeze": "squeezenet1_1-b8a52dc0.pth"}  # fmt: skip


class LpipsWeightsMissing(FileNotFoundError):
    pass


def l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def sample_errors(student: torch.Tensor, teacher: torch.Tensor, judge: str = "l2") -> torch.Tensor:
    """Each sample's error under `judge` (`l2` or `log_l2`), (B,): its mean is the judge's score, lower is better."""
    diff = student - teacher
    mse = diff.to(torch.promote_types(diff.dtype, torch.float32)).pow(2).flatten(1).mean(1)
    if judge == "l2":
        return mse
    if judge == "log_l2":
        return 10 * torch.log10(mse + 1e-12)
    raise ValueError(f"judge {judge!r}: choose one of {tuple(JUDGE_FLOORS)}.")


def psnr_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Minus the mean per-sample PSNR (dB, images in [-1, 1] mapped to [0, 1]; the evaluation's PSNR, uncapped):
    every sample counts alike, where the mean L2 is led by the worst ones."""
    mse = (student - teacher).pow(2).flatten(1).mean(1) / 4  # [0, 1] units
    return 10 * torch.log10(mse + 1e-12).mean()


def ssim_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (torchmetrics, 7 x 7 Gaussian window), on images mapped to [0, 1]."""
    a, b = (student.clamp(-1, 1) + 1) / 2, (teacher.clamp(-1, 1) + 1) / 2
    return 1 - structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=7)


def lpips_network(net: str = "alex") -> torch.nn.Module:
    """The LPIPS network on torchvision's ImageNet `net` backbone, in eval mode and frozen: the one LPIPS set-up of
    the project (this loss, and `evaluate.metrics.lpips_metric`).

    The backbone weights are read from torch's hub cache; offline, a missing file stops here with what to do.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILES[net]
    if not path.is_file():
        raise LpipsWeightsMissing(
            f"LPIPS needs torchvision's pretrained {net} backbone at {path}, and it is not there (no network here). "
            f"Copy {path.name} into {path.parent} from a machine with network access (torchvision downloads it "
            "there), or train with `learn.loss=l2` (or `learn.loss=ssim`)."
        )
    return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)


def lpips_loss(net: str = "alex", min_size: int = 64):
    """LPIPS (`lpips_network`); small or single-channel images are resized and repeated."""
    model = lpips_network(net)

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        def prep(x):
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            return F.interpolate(x, size=min_size, mode="bilinear") if x.shape[-1] < min_size else x

        model.to(student.device)
        return model(prep(student), prep(teacher)).mean()

    return loss


def make_loss(name: str):
    if name == "l2":
        return l2_loss
    if name == "ssim":
        return ssim_loss
    if name == "psnr":
        return psnr_loss
    if name == "lpips":
        return lpips_loss()
    raise ValueError(f"Unknown loss {name!r}; choose one of {LOSSES}.")
