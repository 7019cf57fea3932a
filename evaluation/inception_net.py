"""pytorch-fid's FID InceptionV3 as Flax Linen modules, layer for layer (NHWC).

Module and parameter names are torchvision's (`Conv2d_1a_3x3/conv/kernel`,
`Mixed_5b/branch1x1/bn/scale`...), so a pytorch-fid state dict maps onto them name by
name (`evaluation.inception.params_from_torch`). The FID blocks differ from a plain
InceptionV3: average pools exclude padding (TF's behaviour) in Mixed_5b..5d, 6b..6e and
7b, Mixed_7c's pool branch max-pools, and BatchNorm uses eps 1e-3.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU, as torchvision's."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's average pool ignores the zero padding: pytorch-fid's count_include_pad=False.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b..5d (pytorch-fid's FIDInceptionA)."""

    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's InceptionB, unchanged by pytorch-fid)."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (pytorch-fid's FIDInceptionC)."""

    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's InceptionD, unchanged by pytorch-fid)."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    pool: str  # 'avg' (Mixed_7b) or 'max' (Mixed_7c, a quirk of the TF graph)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception trunk: [B, 299, 299, 3] in [-1, 1] -> [B, 2048] pool features.

    The 1008-way `fc` layer is kept out of the module (see `features_and_logits`), so that
    a state dict without it (pytorch-fid's `InceptionV3` wrapper) still gives features.
    """

    precision: str = "highest"  # f32 convolutions; 'default' lets a GPU use TF32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        conv = functools.partial(BasicConv2d, precision=p)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max_pool_3x3_s2(x)  # [B, 35, 35, 192]
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)  # [B, 35, 35, 288]
        x = InceptionB(p, name="Mixed_6a")(x)  # [B, 17, 17, 768]
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        return jnp.mean(x, axis=(1, 2))  # [B, 2048]
