"""Base configuration shared by every experiment.

Each experiment file imports `get_config` from here and overrides a few fields.
Passing `:smoke` after a config path (``--config configs/cifar10_ct.py:smoke``)
shrinks any config to a seconds-long CPU run (see `shrink`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data: where images come from and how they are batched.
    data = config.data = ml_collections.ConfigDict()
    # cifar10 | digits | npz | folder | fashion_mnist | idx | tfds:<any TFDS image dataset>
    data.name = "cifar10"
    # .npz file for name=npz (array 'images' or 'x', uint8 NHWC); folder for name=folder;
    # idx: a folder of IDX files (MNIST, EMNIST) or one images file; fashion_mnist: '' =
    # /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)
    data.path = ""
    # cifar10: the folder of the official archive ('' = ~/.cache/immiscible_cm/cifar10, then
    # ~/tensorflow_datasets/downloads/manual); tfds:<name>: the TFDS data dir ('' = tfds default)
    data.data_dir = ""
    data.download = True  # cifar10: download cifar-10-python.tar.gz (170 MB) once if missing
    data.split = "train"  # idx / fashion_mnist: train | test
    data.image_size = 32  # idx / fashion_mnist: 32 pads 28 with background, others resize
    data.num_channels = 3
    data.random_flip = True
    data.crop = 0  # center crop (pixels) before resizing to image_size; 0 = none
    data.stream = "auto"  # folder / tfds:<name>: decode on access (auto: when too large)
    data.max_memory_gb = 16.0  # auto streams datasets whose decoded images exceed this
    data.value_range = ""  # npz images that are not uint8: '0,1' | '-1,1' | '0,255'

    # Network F_theta (NCSN++ as in the OpenAI CIFAR-10 consistency-model configs).
    model = config.model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.nf = 128
    model.ch_mult = (2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.0
    model.resblock_type = "biggan"  # biggan | ddpm
    model.resamp_with_conv = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.init_scale = 0.0
    model.embedding_type = "fourier"  # fourier | positional
    model.fourier_scale = 16.0
    model.progressive = "none"  # none | output_skip | residual
    model.progressive_input = "residual"  # none | input_skip | residual
    model.progressive_combine = "sum"  # sum | cat
    model.num_classes = 0  # 0 = unconditional
    model.dtype = "float32"  # activation/matmul dtype: float32 | bfloat16
    model.remat = False  # recompute each block's activations in the backward pass (memory)

    # Consistency model: schedule, parameterisation, loss.
    cm = config.cm = ml_collections.ConfigDict()
    # ct | ict | cd | edm (lognormal sigma: cm.p_mean / p_std) | ddpm (eps) | fm (flow
    # matching); the table of objectives: cm/objectives/
    cm.loss = "ct"
    cm.sigma_min = 0.002
    cm.sigma_max = 80.0
    cm.rho = 7.0
    cm.sigma_data = 0.5
    cm.metric = "pseudo_huber"  # l2 | l1 | pseudo_huber | lpips (VGG16, cm/nets/lpips.py)
    cm.lpips_vgg_path = ""  # torchvision vgg16-397923af.pth; '' = cache dir (downloaded once)
    cm.lpips_lin_path = ""  # LPIPS v0.1 vgg.pth heads; '' = cache, the lpips package, download
    cm.lpips_pool = "max"  # max (the lpips package) | avg (piq's, the OpenAI PyTorch CM code)
    cm.lpips_resize = 224  # images narrower than 256 are resized to this first; 0 = native
    cm.huber_c = -1.0  # < 0: 0.00054 * sqrt(dim), the iCT choice
    cm.start_scales = 2  # s0
    cm.end_scales = 150  # s1
    cm.start_ema = 0.9  # mu0 (CT target EMA); iCT ignores it
    cm.p_mean = -1.1  # iCT discrete lognormal level sampling
    cm.p_std = 2.0
    cm.teacher_workdir = ""  # cm.loss=cd: workdir of the EDM teacher run
    cm.num_timesteps = 1000  # cm.loss=ddpm: T (cm/ddpm.py)
    cm.beta_schedule = "linear"  # cm.loss=ddpm: linear (beta_start..beta_end) | cosine
    cm.beta_start = 1e-4
    cm.beta_end = 0.02
    cm.fm_time = "uniform"  # cm.loss=fm: t uniform on [0, 1] | logit_normal (SD3's)
    cm.fm_logit_mean = 0.0  # logit_normal: t = sigmoid(mean + std * n)
    cm.fm_logit_std = 1.0
    cm.fm_t_scale = 1000.0  # the network's time input is t * this (torchcfm: 1)

    # Immiscible noise assignment (see assignment/).
    assign = config.assignment = ml_collections.ConfigDict()
    assign.method = "none"  # none | linear | knn
    # device: within each device's shard | host: each host's batch | global: the whole
    # global batch, the same permutation on every process (the paper's setting)
    assign.scope = "device"
    assign.where = "host"  # host (background thread) | device (inside the jitted step)
    assign.cost = "l2"  # l2 | sqeuclidean
    assign.dtype = "float32"  # distance dtype: float32 | float16 | bfloat16
    assign.scale = 1.0  # images multiplied by this before the distance
    assign.k = 4  # knn candidates per image
    assign.solver = "auto"  # exact linear solver on the host
    assign.within_class = False  # class-conditional runs: pair noise only within a class
    # linear: draw the batch's pairs again with replacement from the pairing (torchcfm's
    # OT-CFM samples pairs from the exact plan); off: every image once, noise exactly Gaussian
    assign.resample = False
    assign.prefetch = 2  # batches queued ahead of the device

    # Optimiser.
    optim = config.optim = ml_collections.ConfigDict()
    optim.optimizer = "radam"  # radam | adam
    optim.lr = 4e-4
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 0  # linear warmup steps
    optim.decay = "none"  # none | cosine | linear: lr falls to final_lr * lr at training.n_iters
    optim.final_lr = 0.0  # the decay's end, as a fraction of optim.lr
    optim.grad_clip = 0.0  # global-norm clip; 0 = off

    # Training loop.
    training = config.training = ml_collections.ConfigDict()
    training.seed = 0
    training.batch_size = 512  # global batch
    training.n_iters = 800_000
    training.ema_rates = (0.9999,)  # evaluation EMAs of the online parameters
    training.ema_halflife_kimg = 0.0  # > 0: the first EMA rate from a half-life (EDM's way)
    training.init_from = ""  # a workdir to start from (fine-tuning); cd: '' = the teacher
    training.init_step = -1  # init_from's checkpoint step; -1 = the latest
    training.log_every = 100
    training.sample_every = 10_000
    training.snapshot_every = 50_000  # kept checkpoints
    training.keep_snapshots = 3
    training.resume_every = 1_000  # frequent checkpoints, the latest two are kept
    training.n_grid = 64  # images in the sample grid PNG
    training.steps_per_call = 1  # k > 1: k steps per jitted call (unrolled), for small models
    # m > 1: gradient accumulation; the paired global batch is cut into m microbatches whose
    # gradients are averaged before one optimiser step (memory: bench/memory.py)
    training.microbatch = 1
    training.wandb = ""  # a W&B project: log config, metrics, grids and eval rows ('' = off)
    training.transfer_guard = "allow"  # disallow: implicit host<->device copies in the loop fail

    # Sampling.
    sample = config.sample = ml_collections.ConfigDict()
    sample.ts = (80.0,)  # descending times; (sigma_max,) = one step
    sample.ema_index = 0  # which of training.ema_rates to sample with
    sample.n = 64
    sample.batch_size = 256
    sample.step = -1  # checkpoint step; -1 = latest
    sample.solver = "heun"  # EDM runs: heun | euler; DDPM runs: ddim | ddpm (ancestral)
    sample.steps = 18  # EDM runs: Karras time steps; DDPM runs: timesteps visited
    sample.eta = 0.0  # DDPM runs, ddim: 0 = deterministic, 1 = ancestral (posterior variance)
    sample.skip = "uniform"  # DDPM runs: sub-sequence of timesteps, uniform | quadratic
    sample.label = -1  # class-conditional models: a class, or -1 for a class grid
    # clip the model's x0 estimates to the data's [-1, 1] while sampling: each step of
    # multistep consistency sampling (sample.ts, eval 2step) before re-noising, as the
    # OpenAI sampler does, and DDIM/DDPM's x0_hat (ddpm-torch's default). Images are always
    # clipped at the end. Latent runs set it False (latents are not bounded).
    sample.clip_denoised = True

    # Latent training: an autoencoder encodes the dataset once into a latent store, the
    # store is the dataset, samples are decoded before grids and evaluation (docs/latent.md).
    latent = config.latent = ml_collections.ConfigDict()
    # '' = pixel space; a folder in diffusers' layout (config.json + .safetensors), a hub id
    # (stabilityai/sd-vae-ft-mse), or the workdir of a --mode train_ae run
    latent.autoencoder = ""
    latent.factor = 8  # the autoencoder's downsampling (checked against it when loaded)
    latent.channels = 4  # its latent channels (checked)
    latent.store = ""  # the latent store's folder ('' = <workdir>/latents)
    latent.posterior = "mean"  # the store holds the posterior mean | a seeded sample
    latent.encode_batch = 256  # images per encoder call (and per store chunk x 4)
    # --mode train_ae: the autoencoder itself (data, optim, training as for any run)
    latent.ae_channels = (32, 64, 64)  # block_out_channels: one halving per block but the last
    latent.ae_layers = 1  # layers_per_block
    latent.ae_groups = 8  # GroupNorm groups
    latent.kl_weight = 1e-6  # LDM's KL weight (its f4 / f8 KL autoencoders)

    # Evaluation (FID / IS, see evaluation/).
    ev = config.eval = ml_collections.ConfigDict()
    ev.n_samples = 50_000
    ev.batch_size = 500
    ev.samplers = ("1step", "2step")  # EDM runs: heun18, euler50, ...; DDPM: ddim50, ddpm1000
    ev.eta = 0.0  # DDPM runs: eta of the ddimN samplers (recorded in each row)
    ev.skip = "uniform"  # DDPM runs: uniform | quadratic timesteps (recorded as the row's ts)
    ev.two_step_t = 0.821  # intermediate time of two-step sampling
    ev.steps = ""  # checkpoints: '' = all, '1000', '1000-5000', 'latest'
    ev.inception_path = ""  # local pt_inception-2015-12-05 weights (.pth or converted .npz)
    ev.stats_path = ""  # reference statistics (.npz); '' = cache dir default
    ev.cache_dir = "~/.cache/immiscible_cm"
    ev.features = "auto"  # inception | fashion | pixels | auto (fashion for Fashion-MNIST,
    #                       pixels for digits and other 1-channel data)
    ev.fashion_weights = ""  # fd_fashion's classifier: '' = the shipped one (another metric if set)

    return config


def with_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the argument after the config path (`file.py:ARG`): none, or `smoke`.

    Raises:
      ValueError: any other argument (a typo must not run the full config).
    """
    if not arg:
        return config
    if arg == "smoke":
        return shrink(config)
    raise ValueError(f"unknown config argument {arg!r} (after ':'); the only one is 'smoke'")


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to a seconds-long CPU smoke run (big_vision's runlocal)."""
    config.latent.encode_batch = min(config.latent.encode_batch, 8)
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (config.data.image_size // 2,)
    config.training.batch_size = 8
    config.training.n_iters = 4
    config.training.log_every = 2
    config.training.sample_every = 4
    config.training.snapshot_every = 4
    config.training.resume_every = 2
    config.training.n_grid = 4
    config.sample.n = 4
    config.sample.batch_size = 4
    config.sample.steps = min(config.sample.steps, 4)
    config.eval.n_samples = 16
    config.eval.batch_size = 8
    config.optim.warmup = min(config.optim.warmup, 2)
    config.cm.lpips_resize = 0  # LPIPS at the native size: VGG16 at 224 takes CPU minutes
    return config
