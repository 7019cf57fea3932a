"""main.py fails at once, with one clear line and nothing written, on bad flags."""

import pytest

from tests.helpers import run_main


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/quickstart.py", "--config.optim.lrr=1"], 'Did you mean "lr"'),
    (["--config", "configs/does_not_exist.py"], "No such file"),
    (["--config", "configs/quickstart.py", "--config.optim.lr=abc"], "could not convert"),
])
def test_bad_config_fails_before_writing(tmp_path, args, message):
    workdir = tmp_path / "run"
    result = run_main(*args, "--workdir", str(workdir))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_smoke_config_loads_for_every_experiment():
    from configs import celeba64_ct, cifar10_cd, cifar10_ct, cifar10_edm, cifar10_ict, quickstart

    for module in (celeba64_ct, cifar10_cd, cifar10_ct, cifar10_edm, cifar10_ict, quickstart):
        full, smoke = module.get_config(), module.get_config("smoke")
        assert smoke.training.n_iters < full.training.n_iters
        assert smoke.model.nf < full.model.nf or full.model.nf <= 16


def test_overrides_reach_the_mode(tmp_path):
    result = run_main("--config", "configs/quickstart.py", "--config.sample.n=3",
                      "--mode", "sample", "--workdir", str(tmp_path))
    assert "defined twice" not in result.stderr
    assert "no checkpoint" in result.stderr
