"""Every experiment config builds and passes the checks (full and `:smoke`)."""

import importlib
import os

import pytest

from cm import config as config_lib

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..",
                                                         "configs"))
                 if f.endswith(".py") and f not in ("__init__.py", "base.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    module = importlib.import_module(f"configs.{name}")
    cfg = config_lib.build(module.get_config())
    assert cfg.objective.name == cfg.cm.loss
    config_lib.build(module.get_config("smoke"))


def test_the_paper_configs_pair_over_the_global_batch():
    for name in ("cifar10_ct", "cifar10_ict", "cifar10_edm", "cifar10_cd", "cifar10_ddpm",
                 "cifar10_fm", "imagenet256_latent"):
        cfg = config_lib.build(importlib.import_module(f"configs.{name}").get_config())
        assert cfg.assignment.scope == "global", name
