"""Every experiment file in configs/ loads in each variant, and an unknown variant is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgjax.train.config_lib import load_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "tasks")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cpu_variant_uses_a_resnet_except_for_mae(name):
    cluster = load_config(REPO / "configs" / f"{name}.py")
    tiny = load_config(REPO / "configs" / f"{name}.py:tiny")
    cpu = load_config(REPO / "configs" / f"{name}.py:cpu")
    # The same objectives in every variant; only sizes (and, for :cpu, the encoder) change.
    for objective in cluster.objectives:
        weights = {c.objectives[objective].weight for c in (cluster, tiny, cpu)}
        assert len(weights) == 1, (name, objective, weights)
    uses_mae = cluster.objectives.mae.weight > 0
    assert cpu.model.image_encoder == ("vit_mu/8" if uses_mae else "resnet_mu")
    assert cpu.total_steps == 300 and tiny.total_steps == 60


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown config variant 'large'.*'cpu', 'tiny'"):
        load_config(REPO / "configs" / "pg.py:large")
