"""pytorch-fid's own InceptionV3 with random weights, as the reference for parity tests.

Needs torch and pytorch-fid (requirements-test.txt); nothing else in `evaluation` imports
this module. The network is built without downloading anything, and its BatchNorm
parameters and running statistics are randomised (then calibrated on random images so
activations stay O(1) through all 94 layers), so a port that mixed up any tensor would
show.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pfi


def random_fid_inception(seed: int = 0, calibration_images: int = 8) -> torch.nn.Module:
    """`pytorch_fid.inception.fid_inception_v3()` with random weights, in eval mode.

    `fid_inception_v3()` downloads and loads the released weights; here the download
    returns nothing and the load is a no-op, so the model keeps its random init.

    Args:
      seed: torch seed of the weights and of the calibration images.
      calibration_images: random 32x32 images (resized to 299) whose batch statistics
        become the BatchNorm running statistics (before a random perturbation); 0 skips
        this (activations then grow or vanish with depth: fine for I/O tests only).

    Returns:
      the torchvision Inception3 with pytorch-fid's FID blocks (names `Conv2d_1a_3x3`...,
      `fc` [1008, 2048]).
    """
    torch.manual_seed(seed)
    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda *a, **k: None),
    ):
        model = pfi.fid_inception_v3()
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.2, generator=gen)
            bn.momentum = None  # cumulative average: one batch sets the running stats
            bn.reset_running_stats()
        model.fc.weight.normal_(0.0, 0.05, generator=gen)
        model.fc.bias.normal_(0.0, 0.5, generator=gen)
        # Calibrate: running stats from one train-mode pass, then perturb them.
        if calibration_images:
            model.train()
            x = torch.randint(0, 256, (calibration_images, 3, 32, 32), generator=gen) / 255.0
            model(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
        for bn in bns:
            bn.running_mean.add_(
                0.1 * bn.running_var.sqrt() * torch.randn(bn.num_features, generator=gen)
            )
            bn.running_var.mul_(torch.empty(bn.num_features).uniform_(0.8, 1.25, generator=gen))
            bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
    return model.eval()


def fid_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """pytorch-fid's `InceptionV3([3])` (resize, scale, pool) sharing `model`'s modules."""
    with mock.patch.object(pfi, "fid_inception_v3", lambda: model):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict (parameters and buffers) as numpy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@torch.no_grad()
def torch_features_and_logits(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's path for uint8 [N, H, W, 3]: ToTensor, the wrapper, squeeze; + fc.

    Returns:
      float32 pool features [N, 2048] and float32 logits [N, 1008] (`fc(pool)`, with bias).
    """
    wrapper = fid_wrapper(model)
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        x = x.float().div(255)  # torchvision's ToTensor, as pytorch-fid's ImagePathDataset
        pool = wrapper(x)[0].squeeze(3).squeeze(2)  # [B, 2048]
        feats.append(pool.numpy())
        logits.append(F.linear(pool, model.fc.weight, model.fc.bias).numpy())
    return np.concatenate(feats), np.concatenate(logits)
