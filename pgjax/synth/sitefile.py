"""Site files: the hospitals of a synthetic corpus, as TOML or JSON (`pgjax synth --sites FILE`).

A site file has an optional `description` (free text), optional `[[scanners]]` (new scanner
models, so a file can bring a vendor the code has never heard of) and one `[[sites]]` entry per
hospital. Every field but a site's `name` and `fleet` has a default; unknown fields, unknown
scanner models and values out of range are errors that name the file and the field, e.g.
`benchmark.toml: sites[2].view.p_ap_positive must be in [0, 1], not 1.4`. The default file,
default_sites.toml next to this module, is the reference for the format; README.md ("pgjax
synth") describes the fields.

Rules beyond types and ranges: a training site has shift "none"; at every site but a "reversal"
one the protocol flags are taken at least as often for positives as for negatives (sicker
patients go to the bedside everywhere; only the strength differs); a "reversal" site must be
external and take the AP view more often for negatives.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pgjax.synth.sites import (
    MR_SEQUENCES,
    ROLES,
    SCANNERS,
    SHIFTS,
    Scanner,
    Site,
)

DEFAULT_FILE = Path(__file__).with_name("default_sites.toml")

# Transfer syntaxes the writer can produce, by the name a site file uses.
TRANSFER_SYNTAXES = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEG2000Lossless": JPEG2000Lossless,
}
MODALITIES = ("CT", "MR", "XR", "US")
DESCRIPTION_KINDS = ("CT", "CT protocol", "MR", "PA", "AP", "US")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_REQUIRED = object()


class SiteFileError(ValueError):
    """A site file that cannot be used; the message names the file and the field."""


class _Table:
    """One table of a site file: typed reads with defaults, and a check for unknown keys."""

    def __init__(self, data, where: str, file: str):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise SiteFileError(f"{file}: {where or 'the file'} must be a table, not {data!r}")
        self.data, self.known = data, set()

    def loc(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str):
        raise SiteFileError(f"{self.file}: {self.loc(key)} {message}")

    def get(self, key: str, default=_REQUIRED):
        self.known.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.fail(key, "is required")
            return default
        return self.data[key]

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key, default=_REQUIRED, choices=None, max_len=64) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, not {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        if len(value) > max_len:
            self.fail(key, f"must be at most {max_len} characters, not {len(value)}")
        return value

    def boolean(self, key, default=_REQUIRED) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        return value

    def _check_number(self, key, value, lo, hi, integer: bool) -> float:
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            self.fail(key, f"must be {kind}, not {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, f"must be in [{_fmt(lo)}, {_fmt(hi)}], not {_fmt(value)}")
        return value

    def number(self, key, default=_REQUIRED, lo=None, hi=None, integer=False):
        value = self.get(key, default)
        if value is None and default is None:
            return None
        return self._check_number(key, value, lo, hi, integer)

    def fraction(self, key, default=_REQUIRED) -> float:
        return float(self.number(key, default, 0, 1))

    def interval(self, key, default=_REQUIRED, lo=None, hi=None) -> tuple[float, float]:
        value = self.get(key, default)
        if not isinstance(value, list | tuple) or len(value) != 2:
            self.fail(key, f"must be a range [low, high], not {value!r}")
        low, high = (float(self._check_number(key, v, lo, hi, False)) for v in value)
        if low > high:
            self.fail(key, f"must be a range [low, high] with low <= high, not {list(value)}")
        return low, high

    def table(self, key, default=_REQUIRED) -> _Table:
        return _Table(self.get(key, default), self.loc(key), self.file)

    def entries(self, key) -> list[_Table]:
        value = self.get(key, [])
        if not isinstance(value, list):
            self.fail(key, "must be a list of tables ([[" + key + "]] in TOML)")
        return [_Table(v, f"{self.loc(key)}[{i}]", self.file) for i, v in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.known)
        if unknown:
            known = ", ".join(sorted(self.known))
            self.fail(unknown[0], f"is not a known field (known here: {known})")


def _fmt(value) -> str:
    if value is None:
        return "inf"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# Scanners


def _kernel_names(t: _Table) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
    kernels = t.table("kernels")
    out = []
    for kernel_class in ("smooth", "standard", "sharp"):
        value = kernels.get(kernel_class)
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            out.append((kernel_class, tuple(value)))
        elif isinstance(value, str) and value:
            out.append((kernel_class, value))
        else:
            kernels.fail(kernel_class, f"must be a kernel name or a list of names, not {value!r}")
    kernels.finish()
    return tuple(out)


def _scanner(t: _Table) -> Scanner:
    common = dict(
        manufacturer=t.string("manufacturer"),
        model=t.string("model"),
        modality=t.string("modality", choices=MODALITIES),
        software=t.string("software", "1.0"),
    )
    modality = common["modality"]
    if modality == "XR":
        extra = dict(
            portable=t.boolean("portable", False),
            bits_stored=t.number("bits_stored", 12, 8, 16, integer=True),
            gain=float(t.number("gain", 0.22, 0.01, 5)),
            noise_grain=float(t.number("noise_grain", 1.0, 0.2, 2)),
            unsharp=float(t.number("unsharp", 0.6, 0, 3)),
        )
    elif modality == "CT":
        extra = dict(
            kernels=_kernel_names(t),
            rescale_intercept=float(t.number("rescale_intercept", -1024.0, -32768, 0)),
            outside_fov_hu=float(t.number("outside_fov_hu", -1024.0, -32768, -1000)),
            pixel_padding=t.number("pixel_padding", None, -32768, 32767, integer=True),
            hu_offset=float(t.number("hu_offset", 0.0, -50, 50)),
            noise_grain=float(t.number("noise_grain", 1.0, 0.2, 2)),
        )
    elif modality == "MR":
        signed = t.boolean("signed", False)
        extra = dict(
            field_strength=float(t.number("field_strength", lo=0.2, hi=11.7)),
            gain=float(t.number("gain", 3000.0, 1, 1e5)),
            bits_stored=t.number("bits_stored", 16 if signed else 12, 8, 16, integer=True),
            signed=signed,
            rescale_slope=float(t.number("rescale_slope", 1.0, 0.01, 100)),
        )
    else:
        extra = dict(
            transducer=t.string("transducer"),
            gain=float(t.number("gain", 1.0, 0.1, 10)),
        )
    t.finish()
    return Scanner(**common, **extra)


def _scanners(root: _Table) -> dict[str, Scanner]:
    catalogue = dict(SCANNERS)
    for t in root.entries("scanners"):
        scanner = _scanner(t)
        if scanner.model in SCANNERS:
            t.fail("model", f"{scanner.model!r} is a built-in scanner model; choose another name")
        if scanner.model in catalogue:
            t.fail("model", f"{scanner.model!r} is defined twice")
        catalogue[scanner.model] = scanner
    return catalogue


# --------------------------------------------------------------------------------------------
# Sites


def _flags(t: _Table, prefix: str, default: tuple[float, float]) -> tuple[float, float]:
    negative = t.fraction(f"{prefix}_negative", default[0])
    return negative, t.fraction(f"{prefix}_positive", default[1])


def _syntax(t: _Table, key: str) -> str:
    return TRANSFER_SYNTAXES[t.string(key, "ExplicitVRLittleEndian", choices=TRANSFER_SYNTAXES)]


def _fleet(t: _Table, catalogue: dict[str, Scanner]) -> tuple[tuple[Scanner, float], ...]:
    fleet = t.table("fleet")
    out = []
    for model in fleet.data:
        if model not in catalogue:
            known = ", ".join(sorted(catalogue))
            fleet.fail(model, f"is not a known scanner model (known: {known}; a new one goes in "
                              "[[scanners]])")  # fmt: skip
        out.append((catalogue[model], float(fleet.number(model, lo=0))))
    if not any(w > 0 for _, w in out):
        t.fail("fleet", "must list at least one scanner model with a weight above 0")
    return tuple(out)


def _ct_kvp(t: _Table) -> tuple[tuple[float, float], ...]:
    value = t.get("kvp", [[120, 1.0]])
    if not isinstance(value, list) or not value:
        t.fail("kvp", f"must be a list of [kVp, weight] pairs, not {value!r}")
    pairs = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2:
            t.fail("kvp", f"must be a list of [kVp, weight] pairs, not {pair!r}")
        kvp = float(t._check_number("kvp", pair[0], 70, 140, False))
        pairs.append((kvp, float(t._check_number("kvp", pair[1], 0, None, False))))
    if not any(w > 0 for _, w in pairs):
        t.fail("kvp", "needs a weight above 0")
    return tuple(pairs)


def _mr_menus(t: _Table) -> tuple[tuple[tuple[str, ...], float], ...]:
    value = t.get("menus", [[["T1", "T2", "FLAIR"], 1.0]])
    shape = 'a list of [[sequence, ...], weight] pairs, e.g. [[["T2", "FLAIR"], 1.0]]'
    if not isinstance(value, list) or not value:
        t.fail("menus", f"must be {shape}, not {value!r}")
    menus = []
    for menu in value:
        if not (isinstance(menu, list) and len(menu) == 2 and isinstance(menu[0], list)):
            t.fail("menus", f"must be {shape}, not {menu!r}")
        names, weight = menu
        unknown = [n for n in names if n not in MR_SEQUENCES]
        if not names or unknown:
            t.fail("menus", f"names unknown sequences {unknown or names!r} (known: "
                            f"{', '.join(MR_SEQUENCES)})")  # fmt: skip
        menus.append((tuple(names), float(t._check_number("menus", weight, 0, None, False))))
    return tuple(menus)


def _thickness(t: _Table) -> tuple[float, ...]:
    value = t.get("thickness", [1.0, 3.0, 5.0])
    if not isinstance(value, list) or not value:
        t.fail("thickness", f"must be a list of slice thicknesses (mm), not {value!r}")
    return tuple(float(t._check_number("thickness", v, 0.5, 10, False)) for v in value)


def _descriptions(t: _Table, name: str) -> tuple[tuple[str, str], ...]:
    d = t.table("descriptions", {})
    defaults = {
        "CT": "CT ANGIO CHEST",
        "CT protocol": "CTA PE",
        "MR": "MR BRAIN",
        "PA": "CHEST PA",
        "AP": "CHEST AP PORTABLE",
        "US": "US ABDOMEN",
    }
    out = tuple((kind, d.string(kind, defaults[kind])) for kind in DESCRIPTION_KINDS)
    d.finish()
    return out


def _site(t: _Table, catalogue: dict[str, Scanner]) -> Site:
    name = t.string("name")
    if not _NAME.match(name):
        t.fail("name", f"must be a folder name (letters, digits, _ . -), not {name!r}")
    role = t.string("role", "training", choices=ROLES)
    shift = t.string("shift", "none", choices=SHIFTS)
    if role == "training" and shift != "none":
        t.fail("shift", f'of a training site must be "none", not {shift!r} (a shift is what an '
                        "external site changes)")  # fmt: skip
    pid_format = t.string("patient_id_format", "{:07d}")
    try:
        example = pid_format.format(1234567)
    except (IndexError, KeyError, ValueError) as e:
        t.fail("patient_id_format", f"must format one number, e.g. 'A{{:07d}}' ({e})")
    if len(example) > 64 or "/" in example or "\\" in example:
        t.fail("patient_id_format", f"gives {example!r}: at most 64 characters, no slashes")
    prefix = t.string("accession_prefix", re.sub(r"[^A-Z0-9]", "", name.upper())[:3] or "ACC",
                      max_len=8)  # fmt: skip
    if not prefix.isalnum():
        t.fail("accession_prefix", f"must be letters and digits, not {prefix!r}")

    xr = t.table("radiograph", {})
    view = t.table("view", {})
    case = t.table("case_mix", {})
    ct = t.table("ct", {})
    mr = t.table("mr", {})
    site = Site(
        name=name,
        role=role,
        shift=shift,
        institution=t.string("institution", f"{name} hospital"),
        patient_id_format=pid_format,
        accession_prefix=prefix,
        share=float(t.number("share", 1.0, 0)),
        fleet=_fleet(t, catalogue),
        transfer_syntax=_syntax(t, "transfer_syntax"),
        radiograph_modality=xr.string("modality", "DX", choices=("DX", "CR")),
        monochrome1=xr.boolean("monochrome1", False),
        voi=xr.string("voi", "window", choices=("window", "lut", "none")),
        radiograph_transfer_syntax=_syntax(xr, "transfer_syntax"),
        pa_kvp=xr.interval("pa_kvp", (110, 125), 40, 150),
        ap_kvp=xr.interval("ap_kvp", (80, 95), 40, 150),
        pa_mas=xr.interval("pa_mas", (1.0, 4.4), 0.1, 100),
        ap_mas=xr.interval("ap_mas", (0.8, 3.8), 0.1, 100),
        pa_grid=xr.boolean("pa_grid", True),
        ap_grid=xr.boolean("ap_grid", False),
        p_ap=_flags(view, "p_ap", (0.2, 0.5)),
        ctr_mean=float(case.number("ctr_mean", 0.47, 0.35, 0.7)),
        ctr_sd=float(case.number("ctr_sd", 0.05, 0, 0.2)),
        reading_sd=float(case.number("reading_sd", 0.025, 0, 0.2)),
        label_noise=float(case.number("label_noise", 0.04, 0, 0.5)),
        pe_prevalence=case.fraction("pe_prevalence", 0.3),
        glioma_prevalence=case.fraction("glioma_prevalence", 0.5),
        ct_kvp=_ct_kvp(ct),
        ct_thickness=_thickness(ct),
        ct_second_recon=ct.fraction("second_recon", 0.3),
        p_sharp=_flags(ct, "p_sharp", (0.4, 0.6)),
        mr_menus=_mr_menus(mr),
        mr_rectangular=mr.boolean("rectangular", False),
        p_low_field=_flags(mr, "p_low_field", (0.4, 0.6)),
        descriptions=_descriptions(t, name),
    )
    for table in (xr, view, case, ct, mr, t):
        table.finish()
    _check_direction(site, t, view, ct, mr)
    return site


def _check_direction(site: Site, t: _Table, view: _Table, ct: _Table, mr: _Table) -> None:
    """The protocol/label association points the same way at every site but a reversal one."""
    if site.shift == "reversal":
        if not site.external:
            t.fail("shift", '"reversal" is for external sites only; set role = "external"')
        if site.p_ap[0] <= site.p_ap[1]:
            view.fail("p_ap_negative", f"of a reversal site must exceed p_ap_positive "
                                       f"({site.p_ap[1]:g}), not {site.p_ap[0]:g}")  # fmt: skip
        return
    for table, prefix, (negative, positive) in (
        (view, "p_ap", site.p_ap),
        (ct, "p_sharp", site.p_sharp),
        (mr, "p_low_field", site.p_low_field),
    ):
        if positive < negative:
            table.fail(f"{prefix}_positive", f"({positive:g}) is below {prefix}_negative "
                       f"({negative:g}): the association must point the same way at every site; "
                       'only a site with shift = "reversal" reverses it')  # fmt: skip


def parse_sites(data, file: str) -> tuple[Site, ...]:
    """The sites of a parsed site file (a dict); `file` names it in error messages."""
    root = _Table(data, "", file)
    if root.has("description"):
        root.string("description", max_len=10_000)
    catalogue = _scanners(root)
    entries = root.entries("sites")
    root.finish()
    if not entries:
        raise SiteFileError(f"{file}: sites is required: at least one [[sites]] entry")
    out, seen = [], set()
    for t in entries:
        site = _site(t, catalogue)
        if site.name in seen:
            t.fail("name", f"{site.name!r} is used by an earlier site")
        seen.add(site.name)
        out.append(site)
    return tuple(out)


def load_site_file(path) -> tuple[Site, ...]:
    """The sites of a .toml or .json site file (by extension)."""
    path = Path(path)
    file = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SiteFileError(f"{file}: a site file must end in .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SiteFileError(f"{file}: cannot read the site file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SiteFileError(f"{file}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SiteFileError(f"{file}: not valid {suffix[1:].upper()}: {e}") from None
    return parse_sites(data, file)


@functools.cache
def default_sites() -> tuple[Site, ...]:
    """The sites of the default file shipped with the package (site_a ... site_d)."""
    return load_site_file(DEFAULT_FILE)


def select_sites(
    spec=None, n_sites: int | None = None, external: tuple[str, ...] | None = None
) -> tuple[Site, ...]:
    """The sites of a corpus: spec (a site file path, or Site objects; None: the default file),
    its first n_sites when given, and, when external is given, exactly those sites external
    (they keep their shift type; sites made training lose theirs, and a reversal site cannot
    train)."""
    if spec is None:
        chosen = default_sites()
    elif isinstance(spec, str | Path):
        chosen = load_site_file(spec)
    else:
        chosen = tuple(spec)
        if not chosen or not all(isinstance(s, Site) for s in chosen):
            raise ValueError("sites must be a site file path or a non-empty sequence of Site")
    if n_sites is not None:
        if not 1 <= n_sites <= len(chosen):
            raise ValueError(f"number of sites must be 1..{len(chosen)} (the sites of the file), "
                             f"not {n_sites}")  # fmt: skip
        chosen = chosen[:n_sites]
    if external is not None:
        names = [s.name for s in chosen]
        unknown = [n for n in external if n not in names]
        if unknown:
            raise ValueError(f"external site {unknown[0]!r} is not one of {', '.join(names)}")
        updated = []
        for s in chosen:
            if s.name in external:
                updated.append(dataclasses.replace(s, role="external"))
            elif s.shift == "reversal":
                raise ValueError(f"{s.name} is a reversal site and cannot be a training site")
            else:
                updated.append(dataclasses.replace(s, role="training", shift="none"))
        chosen = tuple(updated)
    return chosen
