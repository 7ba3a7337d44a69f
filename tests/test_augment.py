"""Tests of the on-device augmentations (pgjax.train.augment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgjax.train import augment as aug

B, H, W = 8, 32, 32


def _images(seed=0, shape=(B, H, W, 1)):
    return jax.random.uniform(jax.random.key(seed), shape)


def _ramp(shape=(B, H, W, 1)):
    """Every item is the same horizontal ramp, 0 at the left border to 1 at the right."""
    w = shape[-2]
    return jnp.broadcast_to(((jnp.arange(w) + 0.5) / w)[:, None], shape)


@pytest.mark.parametrize("preset", ["native", "light", "simclr"])
def test_presets_keep_shape_dtype_range_and_are_deterministic(preset):
    x = _images()
    f = jax.jit(lambda k, x: aug.augment(k, x, {"preset": preset}))
    a = f(jax.random.key(1), x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, f(jax.random.key(1), x))
    assert not np.allclose(a, f(jax.random.key(2), x))


def test_items_get_different_draws():
    # The same image in every slot: any difference between the outputs is the per-item draw.
    x = jnp.broadcast_to(_images()[:1], (B, H, W, 1))
    out = np.asarray(aug.augment(jax.random.key(0), x, {"preset": "simclr"}))
    distinct = {out[i].tobytes() for i in range(B)}
    assert len(distinct) == B


def test_all_strengths_zero_is_identity():
    x = _images()
    zero = dict(
        crop_scale=(1, 1), crop_ratio=(1, 1), hflip=0, brightness=0, contrast=0, gamma=0,
        noise=0, blur_prob=0,
    )  # fmt: skip
    for cfg in (None, {}, {"preset": "none"}, {"preset": "simclr", **zero}):
        np.testing.assert_array_equal(aug.augment(jax.random.key(0), x, cfg), x)


def test_full_image_crop_is_identity():
    # The crop path itself (not skipped): a crop of the whole image must resample exactly.
    x = _images()[0]
    y = aug.random_resized_crop(jax.random.key(0), x, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_crop_magnifies_a_ramp_by_the_expected_factor():
    # A crop of area fraction s and aspect 1 of a linear ramp is a ramp whose slope is the
    # original slope / sqrt(s): bilinear interpolation of a linear function is exact.
    x = _ramp()
    s = 0.25
    y = aug.augment(jax.random.key(3), x, {"crop_scale": (s, s)})
    slope = np.diff(np.asarray(y[..., 0]), axis=-1)  # [B, H, W - 1]
    np.testing.assert_allclose(slope, np.sqrt(s) / W, rtol=1e-4, atol=1e-6)
    assert np.ptp(np.asarray(y[:, 0, 0, 0])) > 0.05  # crops land at different places


def test_brightness_scales_each_item_by_one_factor():
    x = _images() * 0.5  # stays below 1 after a factor of up to 1.5: no clipping
    y = aug.augment(jax.random.key(0), x, {"brightness": 0.5})
    ratio = np.asarray(y / x)
    per_item = ratio.reshape(B, -1)
    np.testing.assert_allclose(
        per_item, np.broadcast_to(per_item[:, :1], per_item.shape), rtol=1e-5
    )
    assert np.all((per_item >= 0.5 - 1e-6) & (per_item <= 1.5 + 1e-6))
    assert np.ptp(per_item[:, 0]) > 0.05


def test_contrast_keeps_the_mean_and_gamma_keeps_the_ends():
    x = 0.25 + 0.5 * _images()  # contrast factors up to 1.5 stay inside [0, 1]
    y = aug.augment(jax.random.key(0), x, {"contrast": 0.5})
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
    ends = jnp.zeros((B, H, W, 1)).at[:, :, W // 2 :].set(1.0)
    np.testing.assert_array_equal(aug.augment(jax.random.key(0), ends, {"gamma": 0.5}), ends)


def test_jitter_probability_zero_and_one():
    x = _images() * 0.5
    np.testing.assert_array_equal(
        aug.augment(jax.random.key(0), x, {"brightness": 0.5, "jitter_prob": 0.0}), x
    )
    y = aug.augment(jax.random.key(0), x, {"brightness": 0.5, "jitter_prob": 1.0})
    assert np.all(np.abs(np.asarray(y - x)).reshape(B, -1).max(axis=1) > 0)


def test_blur_smooths_and_keeps_constants():
    x = _images()
    y = aug.augment(jax.random.key(0), x, {"blur_prob": 1.0, "blur_sigma": (1.0, 2.0)})
    assert float(jnp.std(y)) < 0.6 * float(jnp.std(x))
    np.testing.assert_allclose(y.mean(), x.mean(), atol=0.02)
    const = jnp.full((B, H, W, 1), 0.3)
    np.testing.assert_allclose(
        aug.augment(jax.random.key(0), const, {"blur_prob": 1.0}), const, atol=1e-6
    )


def test_blur_matches_a_dense_reference():
    x = np.asarray(_images()[0, :, :, 0], np.float64)
    sigma = 1.3
    got = aug.gaussian_blur(jnp.asarray(x)[..., None], sigma, max_sigma=2.0, axes=(0, 1))
    r = 6
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    ref = np.pad(x, r, mode="reflect")
    ref = np.stack([np.convolve(row, taps, mode="valid") for row in ref])
    ref = np.stack([np.convolve(col, taps, mode="valid") for col in ref.T]).T
    np.testing.assert_allclose(got[..., 0], ref, atol=1e-5)


def test_noise_is_zero_mean_and_bounded_by_its_strength():
    x = jnp.full((B, H, W, 1), 0.5)
    y = aug.augment(jax.random.key(0), x, {"noise": 0.1})
    std = np.asarray(jnp.std(y - x, axis=(1, 2, 3)))
    assert np.all(std < 0.11) and np.ptp(std) > 0.005
    assert abs(float(jnp.mean(y - x))) < 0.01


def test_flips_are_off_by_default_and_work_when_asked():
    x = _ramp()
    for preset in aug.PRESETS:
        assert aug.PRESETS[preset].hflip == 0
    y = aug.augment(jax.random.key(0), x, {"hflip": 1.0})
    np.testing.assert_array_equal(y, jnp.flip(x, axis=2))


def test_volumes_augment_in_plane_only():
    v = jnp.broadcast_to(_ramp((B, 1, H, W, 1)), (B, 4, H, W, 1))  # 4 identical slices
    y = jax.jit(lambda k, v: aug.augment(k, v, {"preset": "simclr", "noise": 0.0}))(
        jax.random.key(0), v
    )
    assert y.shape == v.shape
    # Geometry and jitter act on the whole volume alike: the slices stay identical.
    np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1], y.shape), atol=1e-6)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown augment preset"):
        aug.AugmentConfig.from_config({"preset": "strong"})
    with pytest.raises(ValueError, match="unknown augment keys"):
        aug.AugmentConfig.from_config({"brightnes": 0.1})
    with pytest.raises(ValueError, match="crop_scale"):
        aug.AugmentConfig.from_config({"crop_scale": (0.5, 1.5)})
    with pytest.raises(ValueError, match="probability"):
        aug.AugmentConfig(hflip=2.0)
    with pytest.raises(ValueError, match="augment needs"):
        aug.augment(jax.random.key(0), jnp.zeros((4, 8)), {"noise": 0.1})


def test_from_config_reads_configdict_and_overrides_the_preset():
    import ml_collections

    cfg = aug.AugmentConfig.from_config(
        ml_collections.ConfigDict({"preset": "simclr", "crop_scale": [0.2, 1.0]})
    )
    assert cfg.crop_scale == (0.2, 1.0) and cfg.brightness == aug.PRESETS["simclr"].brightness


def _shifted(x, dy, dx):
    """x [H, W, C] moved by (dy, dx) whole pixels, zeros coming in."""
    out = np.zeros_like(x)
    h, w = x.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _protocol_augment(name="pg"):
    from pathlib import Path

    from pgjax.train.config_lib import load_config

    repo = Path(__file__).resolve().parents[1]
    return aug.AugmentConfig.from_config(load_config(repo / "configs" / f"{name}.py").augment)


def test_default_protocol_augmentation_keeps_pixel_scale():
    """The protocol terms' default (configs/pg.py) moves each image by whole pixels and resamples
    nothing: every item is its input shifted, every pixel value the scanner's, so a periodic
    pattern keeps its period and noise its per-pixel statistics."""
    cfg = _protocol_augment("pg")
    assert cfg == aug.PRESETS["native"] and not cfg.crops and cfg.shift > 0
    noise = jnp.clip(0.5 + 0.1 * jax.random.normal(jax.random.key(0), (B, H, W, 1)), 0, 1)
    stripes = jnp.broadcast_to(0.25 + 0.5 * (jnp.arange(W) % 4 < 2)[:, None], (B, H, W, 1))
    m = round(cfg.shift * W)
    for x in (noise, stripes):
        y = np.asarray(jax.jit(lambda k, x: aug.augment(k, x, cfg))(jax.random.key(1), x))
        x = np.asarray(x)
        moves = set()
        for i in range(B):
            found = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)
                     if np.array_equal(y[i], _shifted(x[i], dy, dx))]  # fmt: skip
            assert found, f"item {i} is not a whole-pixel shift of its input"
            moves.add(found[0])
        assert len(moves) > B // 4  # the shifts are drawn per item
    assert set(np.unique(y)) <= {0.0, 0.25, 0.75}  # the stripes, or the zeros shifted in


def test_resized_crop_ablation_still_resizes():
    """configs/pg_resized_crop.py keeps the former default: resized crops, which magnify and
    smooth (white noise loses part of its per-pixel std to the bilinear interpolation)."""
    cfg = _protocol_augment("pg_resized_crop")
    assert cfg == aug.PRESETS["light"] and cfg.crops and cfg.shift == 0
    noise = jnp.clip(0.5 + 0.1 * jax.random.normal(jax.random.key(0), (B, H, W, 1)), 0, 1)
    y = np.asarray(jax.jit(lambda k, x: aug.augment(k, x, cfg))(jax.random.key(1), noise))
    std_in = float(np.std(noise))
    assert all(float(np.std(item)) < 0.95 * std_in for item in y)
    stripes = jnp.broadcast_to(0.25 + 0.5 * (jnp.arange(W) % 4 < 2)[:, None], (B, H, W, 1))
    y = np.asarray(jax.jit(lambda k, x: aug.augment(k, x, cfg))(jax.random.key(1), stripes))
    assert len(np.unique(y)) > 10  # interpolated values between the two stripe levels


def test_shift_is_the_same_on_every_slice_of_a_volume():
    v = jnp.broadcast_to(_images(shape=(B, 1, H, W, 1)), (B, 4, H, W, 1))
    y = aug.augment(jax.random.key(0), v, {"preset": "native"})
    np.testing.assert_array_equal(y, jnp.broadcast_to(y[:, :1], y.shape))
    assert not np.array_equal(y, v)
    with pytest.raises(ValueError, match="shift"):
        aug.AugmentConfig(shift=1.0)
