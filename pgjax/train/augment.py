"""On-device random augmentations of image batches, drawn per item with `jax.random`.

`augment(rng, images, cfg)` maps [B, H, W, C] images (or [B, D, H, W, C] volumes) with values in
[0, 1] to a batch of the same shape and dtype, each item transformed with its own random draw
(`vmap` over the batch, one key per item, so the result does not depend on how the batch is
sharded). Operations, in this order, each skipped at trace time when its strength is zero:

  native-scale crop     a random shift by a whole number of pixels, up to `shift` of each side
                        (torchvision's RandomCrop with `padding`: pad by that much with zeros,
                        crop the original size back). No resampling: every pixel keeps its
                        value, so pixel size and noise texture are the scanner's.
  random resized crop   a crop of `crop_scale` of the area and `crop_ratio` aspect (w/h,
                        log-uniform), resized back to the full size by bilinear interpolation
                        (torchvision's RandomResizedCrop, without its retry loop: a side longer
                        than the image is clipped to the image)
  horizontal flip       with probability `hflip`. Off in every preset: left and right are not
                        interchangeable in medical images (a flipped chest X-ray puts the heart
                        on the wrong side, i.e. shows situs inversus).
  intensity jitter      with probability `jitter_prob`: brightness (multiply by a factor in
                        [1 - b, 1 + b]), contrast (blend with the item's mean by a factor in
                        [1 - c, 1 + c]), both as torchvision's ColorJitter, then gamma
                        (x ** exp(U(-g, g))); clipped to [0, 1] after each
  gaussian blur         with probability `blur_prob`, sigma ~ U(blur_sigma) in pixels
  gaussian noise        additive, std ~ U(0, noise) per item

Geometry (crops, flip, blur) acts in-plane, on H and W only: a volume's slices are all cropped
alike and the slice axis, often much coarser, is left alone. The output is clipped to [0, 1].

Config: `AugmentConfig.from_config(d)` reads a dict or ConfigDict `d` whose optional "preset"
key names one of PRESETS ("none" by default) and whose other keys, the AugmentConfig fields
below, override the preset's values. PRESETS:

  none    identity.
  native  the default of every config (pgjax/train/defaults.py): native-scale crops, shifts
          of up to 1/8 of each side (ours; 4 of 32 pixels in the CIFAR recipe). Nothing else:
          for protocol objectives the pixel size, intensities, contrast and noise texture *are*
          the signal (kernel, kVp, field strength, reconstruction field of view), and changing
          them would teach the encoder to ignore it.
  light   resized crops of 50-100% of the area, aspect 3/4-4/3, bilinear: magnifies by up to
          1.41x, which changes the apparent pixel size and smooths the noise texture. The
          default before `native`; kept for the ablation configs/pg_resized_crop.py.
  simclr  Chen et al. 2020's ImageNet recipe, less what needs colour or flips: crops of 8-100%
          of the area with aspect 3/4-4/3, brightness and contrast jitter of 0.8 with p 0.8
          (colour-jitter strength 1; saturation, hue and random greyscale do not apply to one
          channel), blur with p 0.5 and sigma 0.1-2.0 px.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; zero (or a (1, 1) range) switches an operation off.

    shift: native-scale crop: largest shift, as a fraction of each in-plane side.
    crop_scale: (min, max) fraction of the image area kept by the random resized crop.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop, sampled log-uniformly.
    hflip: probability of a horizontal flip.
    jitter_prob: probability that an item gets the intensity jitter (SimCLR: 0.8).
    brightness, contrast: torchvision ColorJitter strengths (factor in [1 - s, 1 + s]).
    gamma: log-gamma range: x ** exp(U(-gamma, gamma)).
    noise: maximum std of additive gaussian noise (per item std ~ U(0, noise)).
    blur_prob: probability of a gaussian blur; blur_sigma: (min, max) sigma in pixels.
    """

    shift: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    hflip: float = 0.0
    jitter_prob: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        # Config files give lists; the dataclass is hashed and compared, so store tuples.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1] or value[0] <= 0:
                raise ValueError(f"augment {name} must be (min, max) with 0 < min <= max: {value}")
            object.__setattr__(self, name, value)
        if self.crop_scale[1] > 1:
            raise ValueError(f"augment crop_scale {self.crop_scale} exceeds the whole image (1)")
        for name in ("hflip", "jitter_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment {name} must be a probability, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "gamma", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.shift < 1:
            raise ValueError(f"augment shift must be in [0, 1) of the side, got {self.shift}")

    @property
    def crops(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)

    @property
    def jitters(self) -> bool:
        return self.jitter_prob > 0 and (self.brightness > 0 or self.contrast > 0 or self.gamma > 0)

    @property
    def is_identity(self) -> bool:
        geometry = self.shift > 0 or self.crops or self.hflip > 0
        return not (geometry or self.jitters or self.blur_prob > 0 or self.noise > 0)

    @classmethod
    def from_config(cls, cfg=None) -> AugmentConfig:
        """From None (no augmentation), an AugmentConfig, or a dict / ConfigDict with an optional
        "preset" (a PRESETS name) and AugmentConfig fields overriding the preset."""
        if isinstance(cfg, AugmentConfig):
            return cfg
        d = {} if cfg is None else dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        preset = d.pop("preset", "none")
        if preset not in PRESETS:
            raise ValueError(f"unknown augment preset {preset!r}; known: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown augment keys {unknown}; known: preset, {sorted(fields)}")
        return dataclasses.replace(PRESETS[preset], **d)


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "native": AugmentConfig(shift=0.125),
    "light": AugmentConfig(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3)),
    "simclr": AugmentConfig(
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        jitter_prob=0.8,
        brightness=0.8,
        contrast=0.8,
        blur_prob=0.5,
        blur_sigma=(0.1, 2.0),
    ),
}


def augment(rng: jax.Array, images: jax.Array, cfg=None) -> jax.Array:
    """Randomly augment every item of a batch independently.

    rng: a PRNG key. images: [B, H, W, C] or [B, D, H, W, C], values in [0, 1]. cfg: anything
    `AugmentConfig.from_config` takes. Returns the same shape and dtype; the same rng gives the
    same result. An identity config returns `images` itself.
    """
    cfg = AugmentConfig.from_config(cfg)
    if images.ndim not in (4, 5):
        raise ValueError(f"augment needs [B, H, W, C] or [B, D, H, W, C], got {images.shape}")
    if cfg.is_identity:
        return images
    keys = jax.random.split(rng, images.shape[0])
    out = jax.vmap(functools.partial(_augment_one, cfg=cfg))(keys, images.astype(jnp.float32))
    return out.astype(images.dtype)


def _augment_one(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """One item [*spatial, C] (float32); H and W are the axes -3 and -2."""
    k_crop, k_flip, k_jitter, k_blur, k_noise = jax.random.split(key, 5)
    if cfg.shift > 0:
        # Its own key by fold_in: the other operations keep the draws they had before it.
        x = random_shift(jax.random.fold_in(key, 5), x, cfg.shift)
    if cfg.crops:
        x = random_resized_crop(k_crop, x, cfg.crop_scale, cfg.crop_ratio)
    if cfg.hflip > 0:
        flip = jax.random.bernoulli(k_flip, cfg.hflip)
        x = jnp.where(flip, jnp.flip(x, axis=-2), x)
    if cfg.jitters:
        k_apply, k_ops = jax.random.split(k_jitter)
        x = jnp.where(
            jax.random.bernoulli(k_apply, cfg.jitter_prob), _intensity_jitter(k_ops, x, cfg), x
        )
    if cfg.blur_prob > 0:
        k_apply, k_sigma = jax.random.split(k_blur)
        sigma = jax.random.uniform(k_sigma, minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
        blurred = gaussian_blur(x, sigma, max_sigma=cfg.blur_sigma[1], axes=(-3, -2))
        x = jnp.where(jax.random.bernoulli(k_apply, cfg.blur_prob), blurred, x)
    if cfg.noise > 0:
        k_std, k_eps = jax.random.split(k_noise)
        std = jax.random.uniform(k_std, maxval=cfg.noise)
        x = x + std * jax.random.normal(k_eps, x.shape)
    return jnp.clip(x, 0.0, 1.0)


def random_shift(key: jax.Array, x: jax.Array, fraction: float) -> jax.Array:
    """One item [*spatial, C] shifted in-plane by whole pixels, uniform in [-m, m] per axis
    with m = round(fraction * side); what leaves the frame is cut, what enters is 0."""
    margins = [round(fraction * n) for n in x.shape[-3:-1]]
    pad = [(0, 0)] * x.ndim
    pad[-3], pad[-2] = ((m, m) for m in margins)
    starts = [jnp.zeros((), jnp.int32)] * x.ndim
    for axis, m, k in zip((-3, -2), margins, jax.random.split(key), strict=True):
        starts[axis] = jax.random.randint(k, (), 0, 2 * m + 1)
    return jax.lax.dynamic_slice(jnp.pad(x, pad), starts, x.shape)


def random_resized_crop(
    key: jax.Array, x: jax.Array, scale: tuple[float, float], ratio: tuple[float, float]
) -> jax.Array:
    """A random in-plane crop of one item [*spatial, C], resized back to its shape (bilinear).

    The crop covers a fraction ~ U(scale) of the H x W area with aspect (w / h in pixels)
    log-uniform in `ratio`, placed uniformly inside the image; a side that would exceed the
    image is clipped to it.
    """
    h, w = x.shape[-3], x.shape[-2]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, minval=scale[0], maxval=scale[1]) * h * w
    aspect = jnp.exp(
        jax.random.uniform(k_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    )
    crop_h = jnp.minimum(jnp.sqrt(area / aspect), h)
    crop_w = jnp.minimum(jnp.sqrt(area * aspect), w)
    top = jax.random.uniform(k_y) * (h - crop_h)
    left = jax.random.uniform(k_x) * (w - crop_w)
    # scale_and_translate samples output pixel i at input position (i + 0.5 - t) / s (pixel
    # centres at +0.5), so s = size / crop and t = -start * s put the crop [start, start + crop)
    # onto the whole output. Crops never exceed the image: no antialiasing is needed.
    s = jnp.stack([h / crop_h, w / crop_w])
    t = jnp.stack([-top, -left]) * s
    spatial_dims = (x.ndim - 3, x.ndim - 2)
    return jax.image.scale_and_translate(
        x, x.shape, spatial_dims, s, t, method="linear", antialias=False
    )


def _intensity_jitter(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Brightness, contrast and gamma of one item, each clipped to [0, 1] (torchvision clamps
    after every adjustment of a float image)."""
    k_b, k_c, k_g = jax.random.split(key, 3)

    def factor(k, strength):
        return jax.random.uniform(k, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)

    if cfg.brightness > 0:
        x = jnp.clip(x * factor(k_b, cfg.brightness), 0.0, 1.0)
    if cfg.contrast > 0:
        mean = jnp.mean(x)
        x = jnp.clip(mean + factor(k_c, cfg.contrast) * (x - mean), 0.0, 1.0)
    if cfg.gamma > 0:
        x = x ** jnp.exp(jax.random.uniform(k_g, minval=-cfg.gamma, maxval=cfg.gamma))
    return x


def gaussian_blur(
    x: jax.Array, sigma: jax.Array, *, max_sigma: float, axes: tuple[int, ...]
) -> jax.Array:
    """Separable gaussian blur of one item along `axes`, sigma in pixels (may be traced).

    The kernel has a fixed static radius ceil(3 * max_sigma), so a traced per-item sigma needs
    no recompilation; borders are reflected (torchvision's GaussianBlur).
    """
    radius = max(1, math.ceil(3 * max_sigma))
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * jnp.square(taps / sigma))
    kernel = kernel / jnp.sum(kernel)
    for axis in axes:
        axis = axis % x.ndim
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="reflect")
        x = sum(
            kernel[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            for i in range(2 * radius + 1)
        )
    return x
