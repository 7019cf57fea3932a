"""Tiny configs shared by the end-to-end tests."""

from configs import quickstart


def tiny_config(**overrides):
    """The quickstart config shrunk to a model that compiles in seconds, 8x8 digits."""
    config = quickstart.get_config("smoke")
    config.data.image_size = 8
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.training.batch_size = 8
    config.training.n_iters = 6
    config.training.log_every = 1
    config.training.sample_every = 0
    config.training.snapshot_every = 3
    config.training.resume_every = 0
    config.training.n_grid = 8
    config.optim.warmup = 2
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config
