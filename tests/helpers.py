"""Tiny configs shared by the end-to-end tests."""

import os
import subprocess
import sys

from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quickstart's network shape (two levels, attention at 4x4, FIR resampling, residual
# progressive input): for the end-to-end run that keeps the real architecture in the loop
# (test_train.py's run on mock CIFAR-10).
QUICKSTART_NET = {
    "model.ch_mult": (1, 2),
    "model.attn_resolutions": (4,),
    "model.fir": True,
    "model.progressive_input": "residual",
}


# The smallest NCSN++: one level of one residual block, no attention, no FIR, no
# progressive input (tiny_config's default network).
MINIMAL_NET = {
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
    "model.fir": False,
    "model.progressive_input": "none",
}


def override(config, **overrides):
    """Sets `section.field` entries of `config` in place and returns it."""
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def tiny_config(**overrides):
    """The quickstart config shrunk to 8x8 digits and the smallest NCSN++ (one level of
    one residual block, no attention, no FIR, no progressive input): a step compiles in
    about half the time of the quickstart's shape, and the tests that use it are about
    the training loop's plumbing. The network's parts are tested in test_ncsnpp.py; pass
    **QUICKSTART_NET for the real shape."""
    config = quickstart.get_config("smoke")
    config.data.image_size = 8
    config.model.nf = 8
    config.model.num_res_blocks = 1
    override(config, **MINIMAL_NET)
    config.training.batch_size = 8
    config.training.n_iters = 6
    config.training.log_every = 1
    config.training.sample_every = 0
    config.training.snapshot_every = 3
    config.training.resume_every = 0
    config.training.n_grid = 8
    config.optim.warmup = 2
    return override(config, **overrides)


def run_main(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python main.py *args` from the project root on the CPU; output captured."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
