"""The objectives package: its table of terms, its field groups, and checkpoints written before
the move to one module per term (the parameter trees of every config are unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import pgjax.objectives as ob
from pgjax.data.schema import DEFAULT_FIELDS
from pgjax.objectives.base import field_mask
from pgjax.train.config_lib import load_config
from pgjax.train.mesh import path_name

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "tasks")
# Paths and shapes of every variables leaf of configs/NAME.py:tiny, written by the code before
# pgjax/train/objectives.py became this package. A checkpoint restores by these paths, so a
# change here breaks every checkpoint written before it.
TREES = REPO / "tests" / "data" / "objective_trees.json"

KEYWORDS = tuple(f.keyword for f in DEFAULT_FIELDS)


def default_info() -> ob.ProtocolInfo:
    """The default schema with three ids per field (shapes do not depend on the ranges)."""
    ranges = tuple((4 + 3 * i, 7 + 3 * i) for i in range(len(KEYWORDS)))
    return ob.ProtocolInfo(KEYWORDS, ranges, 4 + 3 * len(KEYWORDS))


def variable_tree(config) -> list[str]:
    objective = ob.build_objective(config, default_info(), None)
    f = len(KEYWORDS)
    batch = dict(
        image=jnp.zeros((2, 64, 64, 1)),
        tokens=jnp.full((2, f), 4, jnp.int32),
        values=jnp.zeros((2, f)),
        value_mask=jnp.zeros((2, f)),
    )
    abstract = jax.eval_shape(objective.init, jax.random.key(0), batch)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    return sorted(f"{path_name(k)} {list(x.shape)}" for k, x in leaves)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_parameter_trees_are_those_checkpoints_were_written_with(name):
    expected = json.loads(TREES.read_text())
    assert name in expected, f"{name}: no recorded tree in {TREES.name}"
    assert variable_tree(load_config(REPO / "configs" / f"{name}.py:tiny")) == expected[name]


def test_the_table_names_every_term_in_order():
    assert tuple(ob.TERM_TYPES) == ob.TERMS == tuple(ob.TERM_DEFAULTS)
    for name, term in ob.TERM_TYPES.items():
        assert term.name == name


def test_field_groups_drop_fields_the_schema_lacks_but_hand_lists_do_not():
    info = ob.ProtocolInfo(("Manufacturer", "KVP"), ((4, 5), (5, 6)), 6)
    # The group itself, or the group read back from config.json as a list: lenient.
    assert field_mask(info, ob.DEVICE_FIELDS, "x").tolist() == [True, False]
    assert field_mask(info, list(ob.DEVICE_FIELDS), "x").tolist() == [True, False]
    with pytest.raises(ValueError, match=r"objectives.x: fields not in the schema: \['Softw"):
        field_mask(info, ["Manufacturer", "SoftwareVersions"], "x")
    with pytest.raises(ValueError, match="objectives.x: none of its fields is in the schema"):
        kvp_only = ob.ProtocolInfo(("KVP",), ((4, 5),), 5)
        field_mask(kvp_only, ob.DEVICE_FIELDS, "x")


def _table_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "objectives_table", REPO / "tools" / "objectives_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_rendered_from_the_defaults(monkeypatch):
    tool = _table_tool()
    text = tool.README.read_text()
    start, stop = tool.readme_block(text)
    assert text[start:stop] == ob.settings_table(), "run tools/objectives_table.py"
    assert tool.main(["--check"]) == 0
    # A changed default changes the rendered table, and --check says the README is stale.
    settings = dict(ob.TERM_SETTINGS["masked_protocol"])
    settings["rate"] = ob.defaults.Setting(0.5, settings["rate"].doc)
    monkeypatch.setitem(ob.TERM_SETTINGS, "masked_protocol", settings)
    assert "| `rate` | `0.5` |" in ob.settings_table()
    assert tool.main(["--check"]) == 1


# ---------------------------------------------------------------------------------------------
# One source for each list (issue 14, defect 7)


def test_one_device_field_list_and_one_acquisition_list():
    import pgjax.losses.protocol as protocol_losses
    from pgjax.train.defaults import base_config

    config = base_config()
    assert not hasattr(protocol_losses, "DEVICE_FIELDS")
    assert tuple(config.objectives.translation.target) == ob.DEVICE_FIELDS
    assert tuple(config.objectives.ce_dcm.tags) == ob.DEVICE_FIELDS
    assert ob.TERM_DEFAULTS["translation"]["target"] is ob.DEVICE_FIELDS
    # A translation section that names no fields shows and predicts what configs/pg.py does.
    info = default_info()
    default = ob.build_objective({"objectives": {"translation": {"weight": 1.0}}}, info, None)
    pg = ob.build_objective({"objectives": config.objectives.to_dict()}, info, None)
    for mask in ("source", "target"):
        got = getattr(default.terms["translation"], mask)
        assert got.tolist() == getattr(pg.terms["translation"], mask).tolist(), mask
    shown = [k for k, s in zip(KEYWORDS, default.terms["translation"].source, strict=True) if s]
    assert shown == [k for k in KEYWORDS if k in ob.ACQUISITION_FIELDS]
    assert len(shown) == len(ob.ACQUISITION_FIELDS) == 14


def test_one_set_of_sharding_rules():
    from pgjax.train.defaults import base_config
    from pgjax.train.mesh import DEFAULT_RULES

    assert tuple(tuple(r) for r in base_config().sharding_rules) == DEFAULT_RULES


def test_protocol_info_holds_only_what_the_objectives_read():
    import dataclasses

    names = [f.name for f in dataclasses.fields(ob.ProtocolInfo)]
    assert names == ["keywords", "field_ranges", "vocab_size", "text_fields"]
