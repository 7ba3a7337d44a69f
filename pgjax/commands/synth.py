"""`pgjax synth --out DIR --studies N --seed S [--sites FILE|N]`: write a synthetic multi-site
DICOM corpus.

See pgjax/synth/corpus.py for the layout and the determinism guarantees, and
pgjax/synth/sitefile.py for site files.
"""

from __future__ import annotations

import argparse
import sys

HELP = (
    "write a synthetic multi-site DICOM corpus (CT, MR, CR/DX, US) with ground-truth labels; "
    "deterministic for a seed, whatever the number of workers"
)


def _range(text: str) -> tuple[int, int]:
    """'24-40' or '32' -> (lo, hi)."""
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, not {text!r}") from None


def _mix(text: str) -> tuple[float, float, float, float]:
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 4 numbers, not {text!r}") from None
    if len(weights) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 weights XR,CT,MR,US, not {text!r}")
    return weights


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be empty)")
    p.add_argument("--studies", type=int, default=40, help="number of studies (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--shortcut",
        type=float,
        default=1.0,
        help="0..1: multiplier of every site's protocol/label association (P(AP view), sharp "
        "kernel, 1.5 T given the label, as the site file sets them); 1 (default) takes the file "
        "as written, 0 makes the protocol independent of the label",
    )
    p.add_argument(
        "--sites",
        default=None,
        metavar="FILE|N",
        help="a site file (.toml or .json) describing the hospitals, or N: the first N sites of "
        "the default file (site_a..site_d; site_d is external). Default: the default file",
    )
    p.add_argument(
        "--external-site",
        default=None,
        metavar="NAME[,NAME]",
        help="make exactly these sites external (the others training); 'none' for none "
        "(default: the roles the site file gives)",
    )
    p.add_argument(
        "--mix",
        type=_mix,
        default=(0.5, 0.25, 0.2, 0.05),
        metavar="XR,CT,MR,US",
        help="modality weights (default 0.5,0.25,0.2,0.05)",
    )
    p.add_argument(
        "--clinical",
        type=int,
        default=0,
        metavar="PATIENTS",
        help="instead, the clinical-size preprocessing benchmark corpus for this many patients "
        "(CT 512, radiographs 2500x2048, MR 256-384, enhanced multi-frame CT/MR, one folder per "
        "transfer syntax; pgjax/synth/clinical.py); only --out and --seed apply",
    )
    p.add_argument("--xr-size", type=int, default=256, help="radiograph rows/columns (256)")
    p.add_argument("--ct-size", type=int, default=128, help="CT matrix (128)")
    p.add_argument("--ct-slices", type=_range, default=(24, 40), metavar="LO-HI", help="(24-40)")
    p.add_argument("--mr-size", type=int, default=128, help="MR matrix (128)")
    p.add_argument("--mr-slices", type=_range, default=(16, 24), metavar="LO-HI", help="(16-24)")
    p.add_argument("--us-size", type=int, default=128, help="ultrasound rows (128)")
    p.add_argument("--us-frames", type=int, default=8, help="ultrasound cine frames (8)")
    p.add_argument(
        "--phi-in-description",
        type=float,
        default=0.02,
        metavar="F",
        help="fraction of studies whose study or series description carries the patient's "
        "name, to exercise free-text de-identification (default 0.02)",
    )
    p.add_argument(
        "--repeat-patients",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of studies that belong to a patient seen before (default 0.3)",
    )
    p.add_argument(
        "--shuffled-series",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of CT/MR series whose instance numbers do not follow position (0.1)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes, spawned (default 1)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a synthetic corpus previously written to --out (nothing else is deleted)",
    )


def _sites(text: str | None) -> tuple[str | None, int | None]:
    """--sites: (site file, None) or (None, N)."""
    if text is None:
        return None, None
    try:
        return None, int(text)
    except ValueError:
        return text, None


def _external(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _run_clinical(args: argparse.Namespace) -> int:
    from pgjax.synth.clinical import ClinicalSettings, write_clinical_corpus

    try:
        summary = write_clinical_corpus(
            args.out, ClinicalSettings(patients=args.clinical, seed=args.seed)
        )
    except ValueError as e:
        print(f"pgjax synth: error: {e}", file=sys.stderr)
        return 2
    for name, tally in summary["syntaxes"].items():
        print(f"  {name}: {tally['files']} files, {tally['bytes'] / 1e6:.1f} MB")
    for name, reason in summary["lacking"].items():
        print(f"  not in the mix: {name} ({reason})")
    print(f"wrote the clinical-size corpus to {args.out}/dicom")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.clinical:
        return _run_clinical(args)
    from pgjax.synth.corpus import write_corpus

    site_file, n_sites = _sites(args.sites)
    try:
        summary = write_corpus(
            args.out,
            studies=args.studies,
            seed=args.seed,
            shortcut=args.shortcut,
            sites=site_file,
            n_sites=n_sites,
            external_sites=_external(args.external_site),
            modality_mix=args.mix,
            radiograph_size=args.xr_size,
            ct_size=args.ct_size,
            ct_slices=args.ct_slices,
            mr_size=args.mr_size,
            mr_slices=args.mr_slices,
            us_size=args.us_size,
            us_frames=args.us_frames,
            phi_in_description=args.phi_in_description,
            repeat_patients=args.repeat_patients,
            shuffled_series=args.shuffled_series,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=True,
        )
    except ValueError as e:
        print(f"pgjax synth: error: {e}", file=sys.stderr)
        return 2
    totals = summary["totals"]
    print(
        f"wrote {totals['studies']} studies ({totals['patients']} patients, "
        f"{totals['series']} series, {totals['instances']} files) to {args.out}/dicom"
    )
    for name, site in summary["sites"].items():
        tag = f" (external, {site['shift']} shift)" if site["external"] else ""
        modalities = " ".join(f"{m}={n}" for m, n in site["modalities"].items())
        print(f"  {name}{tag}: {site['studies']} studies  {modalities}")
    label_counts = summary["counts"]["label"]
    labels = " ".join(f"{task} {c['1']}+/{c['0']}-" for task, c in label_counts.items())
    print(f"labels: {args.out}/labels.csv ({labels or 'none'})")
    print(f"summary: {args.out}/corpus.json")
    return 0
