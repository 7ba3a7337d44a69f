"""Experiment configs: Python files whose get_config() returns an ml_collections.ConfigDict.

`load_config("configs/pg.py:tiny", ["model.embed_dim=32"])` loads the file, calls
get_config("tiny") (the text after ':' picks a variant, as in big_vision), and applies
command-line overrides (`--config.model.embed_dim=32`). Values are parsed
as Python literals where they can be (numbers, tuples, booleans), else kept as strings; the
ConfigDict refuses a value of the wrong type and a key that does not exist.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = str(path).partition(":")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"pgjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(config, item, source=str(path))
    return config


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> None:
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"{source}: no config key {key!r} ({name!r} is missing)")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"{source}: no config key {key!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, tuple) and isinstance(value, str):
        value = tuple(v for v in value.split(",") if v)
    node[leaf] = value
