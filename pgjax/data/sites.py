"""The site of each input file, as the store's `site` column will hold it.

A folder name can name a patient ("DOE_JOHN", an MRN): nothing taken from a path reaches the
store unless the user named it. With `site_from="dir"` the site is a salted key of the first
folder below the input root (of the root itself for files directly inside it), unless an
explicit mapping (`--site-names FILE`) gives that folder a readable name.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from pgjax.data.deid import hash_key
from pgjax.data.protocol import normalize_text

SITE_NAMES_HELP = (
    'a JSON object {"folder": "site name", ...} or a CSV with a header row "folder,site"'
)


def site_key(salt: bytes, name: str) -> str:
    """The salted stand-in for a site name the user did not give (8 hex characters)."""
    return "site_" + hash_key(salt, "site", name)[:8]


def site_folder(root: str, path: str) -> str:
    """The folder that names the site of `path`: the first one below the input root, or the
    root's own name for a file directly inside it."""
    rel = Path(os.path.relpath(path, root))
    return rel.parts[0] if len(rel.parts) > 1 else Path(os.path.abspath(root)).name


def site_of(root: str, path: str, ds, site_from: str, salt: bytes, names=None) -> str:
    """names: {folder: site name} from `load_site_names` (site_from "dir" only)."""
    if site_from.startswith("fixed:"):
        return site_from.split(":", 1)[1]
    if site_from == "header":
        name = str(ds.get("InstitutionName", "") or "").strip()
        # The institution name is an identifier in DICOM PS3.15; only its hash is kept.
        return site_key(salt, normalize_text(name)) if name else "unknown"
    folder = site_folder(root, path)
    return (names or {}).get(folder) or site_key(salt, folder)


def load_site_names(path: str | Path) -> dict[str, str]:
    """{folder name: site name} from a JSON or CSV file (see SITE_NAMES_HELP); clear errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"--site-names {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--site-names {path}: not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--site-names {path}: invalid JSON ({e})") from None
        pairs = list(obj.items())
    else:
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
        if not rows or [c.strip().lower() for c in rows[0]] != ["folder", "site"]:
            raise ValueError(
                f"--site-names {path}: want {SITE_NAMES_HELP}; the first row is not 'folder,site'"
            )
        for n, r in enumerate(rows[1:], start=2):
            if len(r) != 2:
                raise ValueError(f"--site-names {path}: row {n} has {len(r)} columns, not 2")
        pairs = [(r[0], r[1]) for r in rows[1:]]
    names: dict[str, str] = {}
    # Errors name the entry by number, not by folder: a folder name can name a patient.
    for k, (folder, site) in enumerate(pairs, start=1):
        if not isinstance(site, str) or not isinstance(folder, str):
            raise ValueError(f"--site-names {path}: entry {k}: names must be strings")
        folder, site = folder.strip(), site.strip()
        if not folder or not site:
            raise ValueError(f"--site-names {path}: entry {k}: an empty folder or site name")
        if folder in names:
            raise ValueError(f"--site-names {path}: entry {k}: the folder is listed twice")
        if not site.isprintable() or "," in site:
            raise ValueError(f"--site-names {path}: entry {k}: site {site!r}: printable, no commas")
        names[folder] = site
    if not names:
        raise ValueError(f"--site-names {path}: no folders listed")
    return names
