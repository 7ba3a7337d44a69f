"""`pgjax pull (--dicomweb URL | --dimse AET@HOST:PORT) --query KEY=VALUE... --out STORE`.

See pgjax/pacs/pull.py for what happens; credentials come from the environment or a file
(pgjax/pacs/credentials.py), never from these arguments.
"""

from __future__ import annotations

import argparse
import sys

from pgjax.commands.preprocess import add_store_arguments, build_config

HELP = (
    "studies from a PACS (DICOMweb QIDO-RS/WADO-RS, or DIMSE C-FIND/C-MOVE/C-GET) into a "
    "store, through the same de-identification and preprocessing as `pgjax preprocess`"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicomweb", metavar="URL", help="DICOMweb root, e.g. https://pacs/dicom-web")
    src.add_argument("--dimse", metavar="AET@HOST:PORT", help="the PACS's DIMSE service")
    p.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DICOM keyword filter, repeatable: StudyDate=20240101-20240131, Modality=CT, "
        "PatientID=..., StudyInstanceUID=..., wildcards * and ?",
    )
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help='DICOMweb credentials, JSON {"user","password"} or {"token"} (mode 600); else '
        "PGJAX_PACS_USER/PGJAX_PACS_PASSWORD or PGJAX_PACS_TOKEN from the environment",
    )
    p.add_argument("--ca-bundle", metavar="FILE", help="DICOMweb over TLS: the CA to trust")
    p.add_argument(
        "--insecure", action="store_true", help="DICOMweb over TLS: do not verify the certificate"
    )
    p.add_argument("--calling-aet", default="PGJAX", help="DIMSE: our AE title (default PGJAX)")
    p.add_argument(
        "--retrieve",
        choices=["auto", "move", "get"],
        default="auto",
        help="DIMSE: C-MOVE to our Storage SCP, C-GET, or C-MOVE falling back to C-GET when "
        "the PACS does not know our AE title (auto, default)",
    )
    p.add_argument("--scp-port", type=int, default=11113, help="DIMSE: our Storage SCP's port")
    p.add_argument("--scp-host", default="0.0.0.0", help="DIMSE: address our Storage SCP binds")
    p.add_argument(
        "--concurrency", type=int, default=4, help="studies retrieved at once (default 4)"
    )
    p.add_argument("--retries", type=int, default=4, help="retries of a transient failure")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S", help="first retry delay")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="network timeout")
    p.add_argument("--page-size", type=int, default=100, help="QIDO-RS results per page")
    add_store_arguments(p)


def parse_query(items: list[str]) -> dict[str, str]:
    from pydicom.datadict import tag_for_keyword

    query = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or tag_for_keyword(key) is None:
            raise ValueError(f"--query {item!r}: want KEYWORD=VALUE with a DICOM keyword")
        query[key] = value
    return query


def make_source(args):
    if args.dicomweb:
        from pgjax.pacs.credentials import load_auth
        from pgjax.pacs.dicomweb import DicomwebSource

        verify = False if args.insecure else (args.ca_bundle or True)
        return DicomwebSource(
            args.dicomweb,
            auth=load_auth(args.auth_file),
            verify=verify,
            timeout_s=args.timeout,
            retries=args.retries,
            backoff_s=args.backoff,
            page_size=args.page_size,
        )
    from pgjax.pacs.dimse import DimseSource

    return DimseSource(
        args.dimse,
        args.calling_aet,
        scp_host=args.scp_host,
        scp_port=args.scp_port,
        retrieve=args.retrieve,
        timeout_s=args.timeout,
        retries=args.retries,
        backoff_s=args.backoff,
    )


def run(args) -> int:
    from pgjax.data.redaction import read_redact_words
    from pgjax.data.schema import load_schema
    from pgjax.pacs.pull import pull
    from pgjax.pacs.source import PacsError, TransientError

    if args.site_from is None:
        args.site_from = "fixed:pacs"
    try:
        source = make_source(args)
        result = pull(
            source,
            parse_query(args.query),
            args.out,
            cfg=build_config(args),
            schema=load_schema(args.schema),
            private=args.private,
            salt_file=args.salt_file,
            labels=args.labels,
            workers=args.workers,
            concurrency=args.concurrency,
            overwrite=args.overwrite,
            compression=args.compression,
            redact_words=read_redact_words(args.redact_words) if args.redact_words else (),
        )
    except TransientError as e:
        print(f"pgjax pull: the PACS is unreachable: {e}; rerun to resume", file=sys.stderr)
        return 1
    except (PacsError, ValueError, FileNotFoundError) as e:
        print(f"pgjax pull: {e}", file=sys.stderr)
        return 2
    mb = result.bytes / 1e6
    rate = mb / result.seconds if result.seconds else 0.0
    print(
        f"fetched {result.fetched} instances ({mb:.1f} MB, {rate:.2f} MB/s); "
        f"{result.already} were already here"
    )
    for key, why in result.failed:
        print(f"study {key}: {why}", file=sys.stderr)
    if result.failed:
        private = args.private or f"{str(args.out).rstrip('/')}.private"
        print(
            f"{len(result.failed)} studies failed; their UIDs are in {private}/pull/failed.csv "
            "(private: keep it local)",
            file=sys.stderr,
        )
    if result.incomplete:
        print("pgjax pull: incomplete, the store was not built; rerun to resume", file=sys.stderr)
        return 1
    if result.up_to_date:
        print(f"store {args.out} is up to date")
        return 0
    c = result.store_summary["manifest"]["counts"]
    print(
        f"store {args.out}: {c['images_ok']}/{c['images']} images, "
        f"{c['volumes_ok']}/{c['volumes']} volumes from {c['files']} files"
    )
    return 0
