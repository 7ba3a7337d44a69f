"""`pgjax train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import sys

HELP = "pretrain from a config file; restarts resume from the last checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:tiny")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.json")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (this run)")
    p.add_argument("--coordinator", help="jax.distributed coordinator HOST:PORT (multi-host)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take `--config.a.b=v` overrides out of the ordinary flags."""
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def run(args) -> int:
    from pgjax.train.config_lib import load_config

    if args.coordinator:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from pgjax.train.train import NonFiniteLoss, train

    try:
        config = load_config(args.config, args.extra)
    except (KeyError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"pgjax train: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    try:
        train(config, args.workdir, max_steps=args.max_steps)
    except NonFiniteLoss as e:
        print(f"pgjax train: {e}", file=sys.stderr)
        return 3
    return 0
