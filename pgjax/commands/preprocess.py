"""`pgjax preprocess DICOM_DIR... --out STORE`: see pgjax/data/preprocess.py for the phases."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HELP = "DICOM files to a de-identified, tokenized TensorStore store (resumable; shardable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="DICOM_DIR", help="folders or files to read")
    add_store_arguments(p)
    p.add_argument(
        "--phase",
        choices=["scan", "plan", "pixels", "finalize", "all"],
        default="all",
        help="run one phase (cluster use) or all (default)",
    )
    p.add_argument("--shard", metavar="I/N", help="this job's share of the scan or pixels phase")
    p.add_argument(
        "--site-names",
        metavar="FILE",
        help="readable site names for input folders (--site-from dir): a JSON object "
        '{"folder": "site", ...} or a CSV "folder,site". Folders not listed, and every folder '
        "without this option, get a salted key (site_1a2b3c4d): a folder name can name a patient",
    )


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """The store and its settings; shared with `pgjax pull`, which feeds the same phases."""
    p.add_argument("--out", required=True, metavar="STORE", help="the store folder to write")
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1)),
        help="worker processes (spawned); 1 runs in this process",
    )
    p.add_argument("--schema", metavar="FILE", help="protocol schema JSON (default: built in)")
    p.add_argument(
        "--redact-words",
        metavar="FILE",
        help="names or phrases to redact from every protocol field, one a line ('#' comments): "
        "for names no header element declares, which K lets through when K patients share them",
    )
    p.add_argument("--labels", metavar="CSV", help="study_uid,task,label[,score] per study")
    p.add_argument(
        "--private",
        metavar="DIR",
        help="private work folder: salt, paths, skip list (default: STORE.private)",
    )
    p.add_argument(
        "--salt-file",
        metavar="FILE",
        help="salt for identity hashes; created if absent (default: PRIVATE/salt). "
        "Reuse one salt for stores whose patients must match",
    )
    p.add_argument(
        "--external-sites",
        default="",
        metavar="A,B",
        help="sites held out whole as the 'external' split, as the store's site column names "
        "them (see --site-from)",
    )
    p.add_argument(
        "--min-patients",
        type=int,
        help="k: keep a header value only if seen for "
        "at least k distinct training patients (default 5)",
    )
    p.add_argument("--image-size", type=int, help="square 2D image size (default 256)")
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="skip files declaring more than N pixels per frame (rows x columns x samples; "
        "default 100000000), checked before anything is allocated",
    )
    p.add_argument(
        "--site-from",
        help="dir (salted key of the first folder below each input, or its --site-names name) "
        "| header (salted key of InstitutionName) | fixed:NAME (default dir)",
    )
    p.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any preprocessing setting (see pgjax/data/config.py), e.g. "
        "--set volume_shape=32,96,96 --set dtype=uint16",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild a store that was made from other inputs or settings",
    )


def _parse_value(text: str, annotation: str):
    if "tuple" in annotation:
        inner = float if "float" in annotation else (int if "int" in annotation else str)
        return tuple(inner(x) for x in text.split(",") if x != "")
    if annotation == "int":
        return int(text)
    if annotation == "float":
        return float(text)
    if annotation == "bool":
        return text.lower() in ("1", "true", "yes")
    return text


def build_config(args):
    from pgjax.data.config import PreprocessConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(PreprocessConfig)}
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: known keys are {', '.join(sorted(fields))}")
        overrides[key] = _parse_value(value, fields[key])
    if args.external_sites:
        overrides["external_sites"] = tuple(s for s in args.external_sites.split(",") if s)
    if args.min_patients is not None:
        overrides["min_patients"] = args.min_patients
    if args.max_pixels is not None:
        overrides["max_pixels"] = args.max_pixels
    if args.image_size is not None:
        overrides["image_size"] = (args.image_size, args.image_size)
    if args.site_from is not None:
        overrides["site_from"] = args.site_from
    return PreprocessConfig(**overrides)


def run(args) -> int:
    from pgjax.data.preprocess import PHASES, parse_shard, preprocess
    from pgjax.data.redaction import read_redact_words
    from pgjax.data.schema import load_schema

    phases = PHASES if args.phase == "all" else (args.phase,)
    if "scan" in phases and not args.inputs:
        print("pgjax preprocess: the scan phase needs DICOM_DIR inputs", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
        summary = preprocess(
            args.inputs,
            args.out,
            redact_words=read_redact_words(args.redact_words) if args.redact_words else (),
            cfg=cfg,
            schema=load_schema(args.schema),
            private=args.private,
            salt_file=args.salt_file,
            labels=args.labels,
            workers=args.workers,
            phases=phases,
            shard=parse_shard(args.shard),
            compression=args.compression,
            overwrite=args.overwrite,
            site_names=args.site_names,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"pgjax preprocess: {e}", file=sys.stderr)
        return 2
    if summary:
        m, rep = summary["manifest"], summary["report"]
        c = m["counts"]
        print(
            f"store {args.out}: {c['images_ok']}/{c['images']} images, "
            f"{c['volumes_ok']}/{c['volumes']} volumes from {c['files']} files"
        )
        if rep["skipped_total"]:
            print(f"skipped {rep['skipped_total']} (files, series or items), by reason:")
            print(json.dumps(rep["skipped_by_reason"], indent=1))
            private = args.private or f"{str(args.out).rstrip('/')}.private"
            print(f"the list with paths is in {private}/skipped.csv (private: keep it local)")
    return 0
