"""ResNet (He et al. 2016, torchvision's v1.5 variant: stride on the 3x3 conv) for 1-channel input.

ResNet-50 is the image backbone of Hu et al. 2020 (CE+DCM). The layout follows torchvision
(conv1/norm1 stem, layerS_I blocks with conv1..3/norm1..3 and downsample_conv/downsample_norm) with
explicit symmetric padding, so that an exported torch model matches to 1e-4. The same code runs on
volumes [B, D, H, W, C]: kernels and strides get one entry per spatial axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pgjax.models.layers import Dtype

# torchvision's conv init: Kaiming normal, fan_out, for ReLU.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

RESNET_CONFIGS = {
    "resnet_mu": dict(stage_sizes=(1, 1, 1, 1), block="basic", width=16),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
}


def resnet_config(name: str) -> dict:
    """ResNet constructor arguments for "resnet_mu" (toy size for CPU tests), "resnet18",
    "resnet34", "resnet50" or "resnet101"."""
    if name not in RESNET_CONFIGS:
        raise ValueError(f"unknown ResNet {name!r}; known: {sorted(RESNET_CONFIGS)}")
    return dict(RESNET_CONFIGS[name])


def _conv(features, kernel, stride, name, *, nd, dtype, param_dtype):
    pad = (kernel - 1) // 2  # torch's symmetric padding, not SAME (asymmetric at stride 2)
    return nn.Conv(
        features,
        kernel_size=(kernel,) * nd,
        strides=(stride,) * nd,
        padding=((pad, pad),) * nd,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). Output channels: `features`.

    `norm(features, name=..., last=False)` builds a normalisation layer (supplied by `ResNet`).
    """

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            _conv, nd=x.ndim - 2, dtype=self.dtype, param_dtype=self.param_dtype
        )
        y = conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(self.norm(self.features, name="norm1")(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = self.norm(self.features, name="norm2", last=True)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, "downsample_conv")(x)
            x = self.norm(self.features, name="downsample_norm")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to 4 * `features`, with a residual connection.

    `norm` as in `BasicBlock`.
    """

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            _conv, nd=x.ndim - 2, dtype=self.dtype, param_dtype=self.param_dtype
        )
        out = self.features * self.expansion
        y = conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(self.norm(self.features, name="norm1")(y))
        y = conv(self.features, 3, self.stride, "conv2")(y)
        y = nn.relu(self.norm(self.features, name="norm2")(y))
        y = conv(out, 1, 1, "conv3")(y)
        y = self.norm(out, name="norm3", last=True)(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = conv(out, 1, self.stride, "downsample_conv")(x)
            x = self.norm(out, name="downsample_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet image encoder without the classifier, for [B, H, W, C] or [B, D, H, W, C] input.

    Attributes:
      stage_sizes: blocks per stage (ResNet-50: (3, 4, 6, 3)); stages 2.. halve the resolution.
      block: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, 4x expansion).
      width: channels of the stem and of the first stage (64 in the paper); doubled per stage.
      norm: "batch" (BatchNorm; running statistics in the `batch_stats` collection, so apply with
        mutable=["batch_stats"] when train=True) or "group" (GroupNorm: no state and no
        cross-device statistics).
      group_norm_groups: GroupNorm groups (32, Wu & He 2018), reduced to gcd(groups, channels).
      axis_name: a mapped axis name over which BatchNorm averages its statistics (synced BN
        under pmap/shard_map); None keeps per-device statistics. Under jit with a sharded batch
        the statistics are already global.
      bn_momentum: running-average decay, 0.9 = torch's momentum 0.1. BN/GN epsilon is 1e-5
        (torch's default).
      zero_init_residual: start each block's last norm scale at 0 (Goyal et al. 2017), so every
        block is an identity at init; off by default, as in torchvision.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64
    norm: str = "batch"
    group_norm_groups: int = 32
    axis_name: str | None = None
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """Returns {"pooled": [B, C] (global average), "tokens": [B, h*w, C] (the final feature
        map flattened row-major, for fusion heads), "feature_map": [B, h, w, C]} (3D: d, h, w)."""
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', not {self.block!r}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', not {self.norm!r}")
        nd = x.ndim - 2
        if nd not in (2, 3):
            raise ValueError(f"ResNet needs [B, H, W, C] or [B, D, H, W, C], got {x.shape}")

        def norm(features, *, name, last=False):
            scale_init = (
                nn.initializers.zeros if last and self.zero_init_residual else nn.initializers.ones
            )
            if self.norm == "batch":
                return nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=1e-5,
                    axis_name=self.axis_name,
                    scale_init=scale_init,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )
            return nn.GroupNorm(
                num_groups=math.gcd(self.group_norm_groups, features),
                epsilon=1e-5,
                scale_init=scale_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        conv = functools.partial(_conv, nd=nd, dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.width, 7, 2, "conv1")(x.astype(self.dtype))
        x = nn.relu(norm(self.width, name="norm1")(x))
        x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)

        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        for s, n_blocks in enumerate(self.stage_sizes):
            for i in range(n_blocks):
                x = block_cls(
                    features=self.width * 2**s,
                    stride=2 if s > 0 and i == 0 else 1,
                    norm=norm,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{s + 1}_{i}",
                )(x)

        b, c = x.shape[0], x.shape[-1]
        return {
            "pooled": x.mean(axis=tuple(range(1, nd + 1))),
            "tokens": x.reshape(b, -1, c),
            "feature_map": x,
        }
