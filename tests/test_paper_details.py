"""Settings the papers fix, read back from the configs that claim them (each test failed on
the configs before 2026-12-06)."""

import numpy as np
import pytest

from cm import config as config_lib
from cm.objectives import SampleOptions, ddpm
from configs import cifar10_ddpm, cifar10_ict


def test_cifar10_ddim_samples_on_the_quadratic_sub_sequence():
    """DDIM App. D.2: CIFAR-10's FIDs use tau_i = floor((i sqrt(0.8 T) / (S - 1))^2), the
    official code's `(np.linspace(0, np.sqrt(T * 0.8), S)) ** 2` cast to int."""
    cfg = config_lib.build(cifar10_ddpm.get_config())
    assert cfg.eval.skip == "quadratic" and cfg.sample.skip == "quadratic"
    for name, steps in (("ddim10", 10), ("ddim50", 50), ("ddim100", 100)):
        spec = ddpm.SAMPLING.named(cfg.cm, name, SampleOptions.of_eval(cfg.eval))
        official = (np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2).astype(int)
        got = np.asarray(spec.times[::-1], int)
        assert len(set(got)) == steps  # distinct steps (the official cast repeats some)
        same = got == official
        assert same.all() if steps == 10 else same[-steps // 2:].all()
        assert got[-1] == 800 and got[0] == 0


def test_ict_uses_adam_with_beta2_0995():
    cfg = config_lib.build(cifar10_ict.get_config())
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2) == (
        "adam", 1e-4, 0.9, pytest.approx(0.995))
