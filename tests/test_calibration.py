"""Calibration (temperature, per protocol group) and the protocol-novelty statistics: NumPy
only, no model. The end-to-end checks (pgjax eval, export round trips, the unseen-vendor site)
are in test_eval.py and test_export.py."""

from __future__ import annotations

import numpy as np
import pytest

from pgjax.eval import calibration as cal


def _logits(rng, n, temperature):
    """Labels drawn from sigmoid(z), logits reported as z * temperature: the temperature that
    calibrates them is `temperature`."""
    z = rng.normal(0.0, 2.0, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(np.float64)
    return z * temperature, y


@pytest.mark.parametrize("temperature", [0.4, 1.0, 2.5])
def test_temperature_fit_recovers_a_known_temperature(temperature):
    z, y = _logits(np.random.default_rng(0), 20000, temperature)
    t = cal.fit_temperature(z, y)
    assert t == pytest.approx(temperature, rel=0.05)
    fitted = cal.fit("temperature", z, y)
    assert fitted["temperature"] == t
    # Calibration lowers the log-loss whenever the logits were mis-scaled.
    if temperature != 1.0:
        assert cal.log_loss(y, z / t) < cal.log_loss(y, z) - 1e-3


def test_protocol_groups_get_their_own_temperature_and_small_ones_fall_back():
    rng = np.random.default_rng(1)
    za, ya = _logits(rng, 4000, 3.0)
    zb, yb = _logits(rng, 4000, 0.5)
    zc, yc = _logits(rng, 10, 3.0)  # too few to fit
    zd = np.full(30, -1.0)  # enough items, one class only
    yd = np.zeros(30)
    z = np.concatenate([za, zb, zc, zd])
    y = np.concatenate([ya, yb, yc, yd])
    keys = np.array(["4,9"] * 4000 + ["5,11"] * 4000 + ["6,12"] * 10 + ["7,13"] * 30, object)
    names = {"4,9": "SIEMENS | Ysio Max", "5,11": "GE | Optima"}
    fit = cal.fit("protocol", z, y, keys, min_count=20, names=names)
    assert set(fit["groups"]) == {"4,9", "5,11"}
    assert fit["groups"]["4,9"]["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fit["groups"]["5,11"]["temperature"] == pytest.approx(0.5, rel=0.1)
    assert fit["groups"]["4,9"]["name"] == "SIEMENS | Ysio Max"
    assert "fewer than 20" in fit["fallback"]["6,12"]["reason"]
    assert "one class" in fit["fallback"]["7,13"]["reason"]
    # The global temperature is the one-temperature fit, and serves every other group, one
    # never seen in validation (a new vendor) included.
    assert fit["temperature"] == pytest.approx(cal.fit_temperature(z, y))
    test_keys = np.array(["4,9", "6,12", "99,99"], object)
    t = cal.temperatures(fit, test_keys)
    np.testing.assert_allclose(t, [fit["groups"]["4,9"]["temperature"], fit["temperature"],
                                   fit["temperature"]])  # fmt: skip
    p = cal.apply(fit, np.array([1.0, 1.0, 1.0]), test_keys)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-1.0 / t)))
    assert list(cal.group_of(fit, test_keys)) == ["SIEMENS | Ysio Max", "global", "global"]
    # Per-group temperatures beat the single one where the groups differ.
    assert cal.log_loss(y, z / cal.temperatures(fit, keys)) < cal.log_loss(
        y, z / fit["temperature"])


def test_calibration_input_errors_are_clear():
    with pytest.raises(ValueError, match="calibrate must be one of none, temperature, protocol"):
        cal.fit("isotonic", [0.0], [1.0])
    with pytest.raises(ValueError, match="needs each validation item's group key"):
        cal.fit("protocol", [1.0, -1.0], [1.0, 0.0])
    one_class = cal.fit("temperature", [1.0, 2.0], [1.0, 1.0])
    assert one_class["temperature"] == 1.0 and "lacks a class" in one_class["reason"]
    with pytest.raises(ValueError, match="not a pgjax calibration file"):
        cal.check_record({"format": "x"}, "f.json")


def test_ledoit_wolf_matches_scikit_learn_and_stays_invertible():
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    from pgjax.novelty import ledoit_wolf

    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 50)) @ rng.normal(size=(50, 50))  # fewer items than dimensions
    ours, shrinkage = ledoit_wolf(x)
    theirs, their_shrinkage = sk_ledoit_wolf(x)
    assert shrinkage == pytest.approx(their_shrinkage, rel=1e-9)
    np.testing.assert_allclose(ours, theirs, atol=1e-6 * np.abs(theirs).max())
    assert np.linalg.eigvalsh(ours).min() > 0
    same, _ = ledoit_wolf(np.ones((5, 4)))  # identical items: still invertible
    assert np.linalg.eigvalsh(same).min() > 0


class _Vocab:
    """A vocabulary of two fields: Manufacturer ids 4-6, BodyPart ids 7-8."""

    keywords = ["Manufacturer", "BodyPart"]
    names = ["<pad>", "<missing>", "<unk>", "<mask>", "SIEMENS", "GE", "Philips", "CHEST", "HEAD"]
    size = len(names)

    def decode(self, i):
        return ("", self.names[i])


def test_novelty_statistics_score_unseen_and_rare_values_and_round_trip(tmp_path):
    from pgjax.novelty import ProtocolStats, fit

    rng = np.random.default_rng(3)
    tokens = np.array([[4, 7]] * 150 + [[5, 7]] * 49 + [[6, 8]] * 1)  # Philips in 1 of 200
    emb = rng.normal(size=(200, 6))
    stats = fit(tokens, emb, _Vocab(), rare_fraction=0.01)
    assert stats.token_counts[0, 4] == 150 and stats.n_items == 200
    unusual = stats.unusual(np.array([[4, 7], [6, 8], [2, 0], [1, 7]]))
    assert unusual[0] == []
    assert unusual[1] == ["Manufacturer=Philips (rare)", "BodyPart=HEAD (rare)"]
    assert unusual[2] == ["Manufacturer=<unk> (unseen)"]  # PAD is no value
    assert unusual[3] == ["Manufacturer=<missing> (unseen)"]
    # Mahalanobis distance: the training mean scores 0; far points score more.
    d = stats.distance(np.stack([emb.mean(axis=0), emb.mean(axis=0) + 10.0]))
    assert d[0] == pytest.approx(0.0, abs=1e-9) and d[1] > stats.train_quantiles["p99"]
    assert stats.train_quantiles["p50"] < stats.train_quantiles["p99"]
    stats.save(tmp_path / "s.npz")
    back = ProtocolStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.distance(emb), stats.distance(emb))
    assert back.unusual(tokens[-1:]) == stats.unusual(tokens[-1:])
    image_only = fit(tokens, None, _Vocab())
    assert not image_only.has_embedding
    with pytest.raises(ValueError, match="no protocol encoder"):
        image_only.distance(emb)
    with pytest.raises(ValueError, match="tokens must be"):
        stats.unusual(np.zeros((2, 3), np.int64))
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.npz: unreadable protocol statistics"):
        ProtocolStats.load(tmp_path / "bad.npz")
