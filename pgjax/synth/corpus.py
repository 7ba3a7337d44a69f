"""Sample a synthetic multi-site corpus and write it as DICOM files with ground-truth labels.

Layout under OUT:
  dicom/<site>/<PatientID>/<StudyInstanceUID>/<SeriesNumber>/<InstanceNumber>.dcm
  labels.csv   study_uid,task,label,score: score is the true latent (cardiomegaly: the true
               cardiothoracic ratio, the label is a noisy read of it; pe: clot diameter in mm,
               0 when negative; glioma_grade: aggressiveness in [0, 1], high grade above 0.5)
  site_names.csv  folder,site: the folders under dicom/ are site names, not patients; pass it to
               `pgjax preprocess --site-names` so the store keeps them readable
  corpus.json  settings, counts per site / vendor / modality / label, and per site its role,
               shift type, prevalence and P(protocol flag | label), expected and observed.
               Nothing identifying: fake PHI lives only in dicom/ (headers and the PatientID
               folder names) and labels.csv holds study UIDs only.

Determinism: a plan (site, modality, patient of every study) is drawn from one generator; each
patient is then derived from np.random.default_rng([seed, PATIENT, index]) and each study from
np.random.default_rng([seed, STUDY, index]), and UIDs from the seed through pydicom's
generate_uid(entropy_srcs=...). No clock is read, so the bytes are identical on a rerun and for
any worker count.

Rerunning: write_corpus refuses an OUT that already holds files. With overwrite=True it deletes a
previous synthetic corpus (recognised by its corpus.json, written first with "complete": false
and replaced by the summary at the end) and writes the new one; nothing else in OUT is deleted.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import multiprocessing
import shutil
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from pgjax.synth import phantoms, physics, sitefile, sites
from pgjax.synth.sites import Scanner, Site

CORPUS_FORMAT = "pgjax-synth-corpus"
CORPUS_VERSION = 1

KINDS = ("XR", "CT", "MR", "US")  # XR: CR or DX, as the site writes radiographs

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
}

# Streams of np.random.default_rng([seed, STREAM, index]).
_PLAN, _PATIENT, _STUDY, _ANATOMY, _STAFF = 0, 1, 2, 3, 4

# What the protocol flag means for each task (for corpus.json).
FLAG_MEANING = {
    "cardiomegaly": "ViewPosition AP (bedside, portable unit)",
    "pe": "sharp primary reconstruction kernel",
    "glioma_grade": "1.5 T scanner",
}

# Fake names, Latin-1 accents included (SpecificCharacterSet ISO_IR 100), as real PACS hold them.
_FAMILY = tuple(
    "NGUYEN|SMITH|GARCIA|MÜLLER|ROSSI|KOWALSKI|OKAFOR|TANAKA|IVANOVA|DUBOIS|GONZÁLEZ|JOHANSSON|"
    "O'BRIEN|PATEL|KIM|SCHMIDT|DA SILVA|MENSAH|HANSEN|FISCHER|ALVAREZ|WANG|BROWN|NOWAK|LEBLANC|"
    "YILMAZ|HOFFMANN|MARTIN|COHEN|RAHMAN|BERG|WALSH|SANTOS|HUBER|ANDERSEN|LI|PETROV|MORENO|"
    "JANSEN|KHAN|TAYLOR|FERRARI|NAKAMURA|ADEYEMI|LÓPEZ".split("|")
)
_GIVEN = {
    "F": tuple(
        "MARIA|ANNA|FATIMA|YUKI|CHLOE|AMARA|INGRID|SOFÍA|LEILA|HANNAH|PRIYA|ELENA|ZOE|GRACE|MEI|"
        "OLGA|AISHA|CLAIRE|NORA".split("|")
    ),
    "M": tuple(
        "JOHN|WEI|AHMED|LUCAS|KWAME|HIROSHI|JÖRG|MATEO|DMITRI|OMAR|RAJ|PIERRE|SAMUEL|TOMÁS|ERIK|"
        "DAVID|ARJUN|FELIX|LIAM".split("|")
    ),
}


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """Every knob of a corpus; recorded in corpus.json."""

    studies: int
    seed: int = 0
    shortcut: float = 1.0  # multiplier of each site's protocol/label association
    sites: tuple[Site, ...] | None = None  # None: the default site file's
    site_file: str = "default"  # the name of the file the sites came from, for the record
    modality_mix: tuple[float, float, float, float] = (0.5, 0.25, 0.2, 0.05)  # XR, CT, MR, US
    radiograph_size: int = 256
    ct_size: int = 128
    ct_slices: tuple[int, int] = (24, 40)
    mr_size: int = 128
    mr_slices: tuple[int, int] = (16, 24)
    us_size: int = 128
    us_frames: int = 8
    phi_in_description: float = 0.02
    repeat_patients: float = 0.3
    shuffled_series: float = 0.1

    def __post_init__(self):
        problems = []
        if self.studies < 1:
            problems.append(f"studies must be >= 1, not {self.studies}")
        if not 0.0 <= self.shortcut <= 1.0:
            problems.append(f"shortcut must be in [0, 1], not {self.shortcut}")
        if len(self.modality_mix) != 4 or min(self.modality_mix) < 0 or sum(self.modality_mix) <= 0:
            mix = self.modality_mix
            problems.append(f"modality_mix must be 4 weights >= 0 (XR, CT, MR, US), not {mix}")
        for name in ("phi_in_description", "repeat_patients", "shuffled_series"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be a fraction in [0, 1], not {getattr(self, name)}")
        for name in ("radiograph_size", "ct_size", "mr_size", "us_size"):
            if not 16 <= getattr(self, name) <= 2048:
                problems.append(f"{name} must be 16..2048 pixels, not {getattr(self, name)}")
        for name in ("ct_slices", "mr_slices"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 2000:
                problems.append(f"{name} must be a range 1 <= lo <= hi, not {(lo, hi)}")
        if not 1 <= self.us_frames <= 1000:
            problems.append(f"us_frames must be 1..1000, not {self.us_frames}")
        if self.sites is None:
            object.__setattr__(self, "sites", sitefile.default_sites())
        object.__setattr__(self, "sites", tuple(self.sites))
        if not self.sites or sum(s.share for s in self.sites) <= 0:
            problems.append("sites must hold at least one site with a share above 0")
        for kind, weight in zip(KINDS, self.modality_mix, strict=True):
            lacking = [s.name for s in self.sites if weight > 0 and not s.scanners(kind)]
            if lacking:
                problems.append(f"the modality mix asks for {kind} but site {lacking[0]} has no "
                                f"{kind} scanner in its fleet")  # fmt: skip
        if problems:
            raise ValueError("bad synth settings: " + "; ".join(problems))

    @property
    def n_sites(self) -> int:
        return len(self.sites)


def _rng(settings: SynthSettings, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, stream, index])


def _uid(settings: SynthSettings, *parts) -> str:
    return generate_uid(entropy_srcs=["pgjax-synth", str(settings.seed), *map(str, parts)])


# --------------------------------------------------------------------------------------------
# Plan and patients


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    index: int
    site: int
    kind: str  # XR, CT, MR or US
    patient: int
    visit: int  # 0 for a patient's first study


def plan_corpus(settings: SynthSettings) -> list[StudyPlan]:
    """Site, modality and patient of every study. Patients belong to one site; a fraction of
    studies (repeat_patients) go to a patient seen before, so patients have several studies."""
    rng = _rng(settings, _PLAN, 0)
    mix = np.asarray(settings.modality_mix, dtype=float)
    kinds = rng.choice(len(KINDS), size=settings.studies, p=mix / mix.sum())
    shares = np.array([s.share for s in settings.sites], dtype=float)
    site_of = rng.choice(settings.n_sites, size=settings.studies, p=shares / shares.sum())
    repeat = rng.random(settings.studies) < settings.repeat_patients
    pick = rng.random(settings.studies)
    patients_at: list[list[int]] = [[] for _ in range(settings.n_sites)]
    visits: list[int] = []
    plans = []
    for i in range(settings.studies):
        site = int(site_of[i])
        known = patients_at[site]
        if repeat[i] and known:
            patient = known[int(pick[i] * len(known))]
        else:
            patient = len(visits)
            visits.append(0)
            known.append(patient)
        plans.append(StudyPlan(i, site, KINDS[int(kinds[i])], patient, visits[patient]))
        visits[patient] += 1
    return plans


@dataclasses.dataclass(frozen=True)
class Patient:
    """A fake patient: identity (PHI), and the latent ground truth that persists across visits."""

    index: int
    family: str
    given: str
    sex: str
    birth_date: dt.date
    patient_id: str
    first_visit: dt.date
    visit_gaps_days: tuple[int, ...]
    ctr: float  # true cardiothoracic ratio (PA-equivalent), 4 decimals
    glioma_aggressiveness: float  # 4 decimals; high grade above 0.5

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    def visit_date(self, visit: int) -> dt.date:
        return self.first_visit + dt.timedelta(days=sum(self.visit_gaps_days[:visit]))


def _latent_score(rng: np.random.Generator, positive: bool, low, threshold, high) -> float:
    """A continuous ground truth on the right side of the threshold, rounded to 4 decimals;
    positives lie strictly above it so that label == (score > threshold) holds in the CSV."""
    if positive:
        return round(float(rng.uniform(threshold + 1e-4, high)), 4)
    return round(float(rng.uniform(low, threshold)), 4)


def make_patient(settings: SynthSettings, index: int, site_index: int) -> Patient:
    """The patient with this index, identical in every process that asks."""
    rng = _rng(settings, _PATIENT, index)
    site = settings.sites[site_index]
    sex = "F" if rng.random() < 0.5 else "M"
    family = str(rng.choice(_FAMILY))
    given = str(rng.choice(_GIVEN[sex]))
    if rng.random() < 0.15:
        given += "^" + "ABCDEFGHJKLMNPRSTW"[int(rng.integers(18))]  # a middle initial
    first_visit = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 11 * 365)))
    age_days = int(rng.uniform(18, 90) * 365.25)
    # The true ratio is continuous and its distribution is the site's case mix; the label is a
    # read of it (draw_truth), so positives and negatives overlap near the threshold.
    ctr = float(np.clip(rng.normal(site.ctr_mean, site.ctr_sd), *sites.CTR_LIMITS))
    high_grade = rng.random() < sites.site_prevalence("glioma_grade", site)
    # A bijection of the index onto 7 digits: unique IDs that do not count up visibly.
    number = (index * 7919 + 104729) % 10_000_000
    return Patient(
        index=index,
        family=family,
        given=given,
        sex=sex,
        birth_date=first_visit - dt.timedelta(days=age_days),
        patient_id=site.patient_id_format.format(number),
        first_visit=first_visit,
        visit_gaps_days=tuple(int(d) for d in rng.integers(14, 700, size=64)),
        ctr=round(ctr, 4),
        glioma_aggressiveness=_latent_score(rng, high_grade, 0.0, 0.5, 1.0),
    )


def _age(patient: Patient, on: dt.date) -> int:
    years = on.year - patient.birth_date.year
    return years - ((on.month, on.day) < (patient.birth_date.month, patient.birth_date.day))


# --------------------------------------------------------------------------------------------
# Ground truth and the shortcut


@dataclasses.dataclass(frozen=True)
class StudyTruth:
    """A study's task, label and protocol flag (see FLAG_MEANING); all None for ultrasound."""

    task: str | None
    label: int | None
    flag: bool | None


def draw_truth(
    rng: np.random.Generator, settings: SynthSettings, site: Site, patient: Patient, kind: str
) -> StudyTruth:
    """The label of a study and its protocol flag: the first draws from the study's generator,
    so the same truth comes out whether or not the pixels are made.

    Cardiomegaly is read per study: the true ratio plus the reader's error, thresholded, and a
    small share of labels flipped outright (site.label_noise), as reports disagree in practice.
    The flag (AP view for cardiomegaly) then depends on the label, as sicker patients are imaged
    at the bedside; its effect on the image is the physics of the projection, nothing else.
    """
    task = sites.TASKS.get(kind)
    if task is None:
        return StudyTruth(None, None, None)
    if task == "cardiomegaly":
        read = patient.ctr + rng.normal(0.0, site.reading_sd)
        label = int(read > sites.CTR_THRESHOLD)
        if rng.random() < site.label_noise:
            label = 1 - label
    elif task == "glioma_grade":
        label = int(patient.glioma_aggressiveness > 0.5)
    else:  # a pulmonary embolus is acute: drawn per study at the site's prevalence
        label = int(rng.random() < sites.site_prevalence(task, site))
    flag = bool(rng.random() < sites.flag_probability(label, task, site, settings.shortcut))
    return StudyTruth(task, label, flag)


def study_truths(settings: SynthSettings) -> list[tuple[StudyPlan, StudyTruth]]:
    """Plan and truth of every study of a corpus, without making pixels (cheap: for checking
    prevalence and the protocol/label association on large corpora)."""
    out = []
    for plan in plan_corpus(settings):
        patient = make_patient(settings, plan.patient, plan.site)
        rng = _rng(settings, _STUDY, plan.index)
        out.append((plan, draw_truth(rng, settings, settings.sites[plan.site], patient, plan.kind)))
    return out


# --------------------------------------------------------------------------------------------
# Series: pixels plus header attributes, before they become files


@dataclasses.dataclass
class Series:
    number: int
    modality: str  # as written: CT, MR, CR, DX, US
    scanner: Scanner
    description: str
    protocol_name: str
    attrs: dict  # series-level header attributes, keyword -> value
    images: list  # per instance: (pixels, per-instance attrs)
    signed: bool
    bits_stored: int
    photometric: str = "MONOCHROME2"
    shuffled: bool = False


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """What one study contributed, for labels.csv and corpus.json (no PHI but the UID)."""

    index: int
    site: str
    modality: str
    patient: int
    study_uid: str
    labels: tuple[tuple[str, int, float], ...]
    flag: bool | None
    manufacturers: tuple[str, ...]
    models: tuple[str, ...]
    transfer_syntax: str
    n_series: int
    n_instances: int
    phi_in_description: bool
    shuffled_series: int


def _stack_order(rng, n: int, settings: SynthSettings, descending: bool):
    """InstanceNumber of each slice (slice k -> number); sometimes shuffled."""
    if rng.random() < settings.shuffled_series:
        return [int(v) + 1 for v in rng.permutation(n)], True
    order = range(n, 0, -1) if descending else range(1, n + 1)
    return list(order), False


def _geometry_attrs(stack: physics.SliceStack, k: int, table_offset: np.ndarray) -> dict:
    position = stack.first_pixel(k) + table_offset
    normal = stack.normal
    return {
        "ImagePositionPatient": [round(float(v), 4) for v in position],
        "ImageOrientationPatient": [round(float(v), 6) for v in (*stack.row_dir, *stack.col_dir)],
        "SliceLocation": round(float(position @ normal), 4),
    }


def _radiograph_series(rng, settings, site, patient, plan, truth) -> tuple[list[Series], tuple]:
    y, ap = truth.label, truth.flag
    scanner = sites.choose_scanner(rng, site, "XR", accept=lambda s: s.portable == ap)
    protocol = sites.sample_radiograph_protocol(rng, site, ap, settings.radiograph_size)
    chest = phantoms.sample_chest(
        _rng(settings, _ANATOMY, patient.index), patient.ctr, patient.sex == "F"
    )
    pixels = physics.expose_radiograph(chest, protocol, scanner, rng)
    top = 2**scanner.bits_stored - 1
    photometric = "MONOCHROME1" if site.monochrome1 else "MONOCHROME2"
    if site.monochrome1:  # stored inverted: low values display white
        pixels = (top - pixels).astype(np.uint16)
    attrs = {
        "BodyPartExamined": "CHEST",
        "ViewPosition": protocol.view,
        "PatientOrientation": ["L", "F"],
        "KVP": protocol.kvp,
        "XRayTubeCurrent": protocol.tube_current_ma,
        "ExposureTime": protocol.exposure_time_ms,
        "Exposure": max(1, int(round(protocol.exposure_mas))),
        "ExposureInuAs": int(round(protocol.exposure_mas * 1000)),
        "DistanceSourceToDetector": protocol.sid_mm,
        "DistanceSourceToPatient": protocol.sid_mm - 200.0,
        "Grid": "IN" if protocol.grid else "NONE",
        "ImagerPixelSpacing": [round(protocol.pixel_spacing, 6)] * 2,
        "PixelSpacing": [round(protocol.pixel_spacing, 6)] * 2,
        "ImageType": ["ORIGINAL", "PRIMARY"],
    }
    if site.radiograph_modality == "DX":
        attrs["PresentationIntentType"] = "FOR PRESENTATION"
        attrs["ImageLaterality"] = "U"
    body = pixels[pixels != (top if site.monochrome1 else 0)]
    lo, hi = np.percentile(body if body.size else pixels, [1, 99])
    if site.voi == "window":
        attrs["WindowCenter"] = round(float(lo + hi) / 2, 1)
        attrs["WindowWidth"] = round(float(max(hi - lo, 1)), 1)
    elif site.voi == "lut":
        attrs["VOILUTSequence"] = _sigmoid_voi_lut(scanner.bits_stored, lo, hi)
    kind = protocol.view
    series = Series(
        number=1,
        modality=site.radiograph_modality,
        scanner=scanner,
        description=f"{'CHEST' if scanner.manufacturer != sites.PHILIPS else 'Thorax'} {kind}",
        protocol_name=site.description(kind),
        attrs=attrs,
        images=[(pixels, {"InstanceNumber": 1})],
        signed=False,
        bits_stored=scanner.bits_stored,
        photometric=photometric,
    )
    return [series], (("cardiomegaly", y, patient.ctr),)


def _sigmoid_voi_lut(bits: int, lo: float, hi: float) -> DicomSequence:
    """A VOI LUT as some vendors ship it: a sigmoid over the useful range of stored values."""
    n = 2**bits
    x = np.arange(n, dtype=np.float64)
    centre, width = (lo + hi) / 2, max(hi - lo, 1.0)
    table = np.rint(4095 / (1 + np.exp(-4 * (x - centre) / width))).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [n if n < 65536 else 0, 0, 12]
    item.LUTExplanation = "SIGMOID"
    item.add_new(0x00283006, "OW", table.astype("<u2").tobytes())  # LUTData
    return DicomSequence([item])


def _ct_series(rng, settings, site, patient, plan, truth) -> tuple[list[Series], tuple]:
    y, sharp = truth.label, truth.flag
    scanner = sites.choose_scanner(rng, site, "CT")
    chest = phantoms.sample_chest(
        _rng(settings, _ANATOMY, patient.index), patient.ctr, patient.sex == "F"
    )
    acquisition, recons = sites.sample_ct_protocol(
        rng, site, sharp, 2 * chest.body_radii[0], settings.ct_size, settings.ct_slices
    )
    # The finding must be inside every reconstruction: the intersection of their slabs.
    z_range = (max(r.z_range[0] for r in recons), min(r.z_range[1] for r in recons))
    clot = phantoms.sample_pe_clot(rng, chest, z_range) if y else None
    mimic = phantoms.sample_mixing_artifact(rng, chest, z_range) if rng.random() < 0.15 else None
    layers = phantoms.chest_ct_layers(chest, clot, mimic)
    iodine = float(np.clip(rng.normal(11.0, 3.0), 4.0, 18.0))
    table = np.array([rng.normal(0, 5), rng.normal(-150, 20), rng.normal(-180, 40)])
    series = []
    for number, recon in enumerate(recons, start=2):  # series 1 is the scout, not written
        hu = physics.scan_ct(layers, iodine, acquisition, recon, scanner, rng)
        stored = physics.hu_to_stored(hu, 1.0, scanner.rescale_intercept)
        stack = physics.ct_stack(recon)
        numbers, shuffled = _stack_order(rng, recon.n_slices, settings, descending=True)
        kernel = scanner.kernel_name(recon.kernel_class)
        window = (-600, 1500) if recon.kernel_class == "sharp" else (40, 400)
        attrs = {
            "BodyPartExamined": "CHEST",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "KVP": acquisition.kvp,
            "XRayTubeCurrent": acquisition.tube_current_ma,
            "ExposureTime": int(round(acquisition.rotation_s * 1000)),
            "Exposure": acquisition.exposure_mas,
            "ConvolutionKernel": list(kernel) if isinstance(kernel, tuple) else kernel,
            "SliceThickness": recon.slice_thickness,
            "SpacingBetweenSlices": recon.slice_spacing,
            "PixelSpacing": [round(recon.pixel_spacing, 6)] * 2,
            "ReconstructionDiameter": recon.fov_mm,
            "ContrastBolusAgent": acquisition.contrast_agent,
            "ContrastBolusRoute": "IV",
            "ScanOptions": "HELICAL MODE",
            "PatientPosition": "HFS",
            "RescaleIntercept": scanner.rescale_intercept,
            "RescaleSlope": 1.0,
            "RescaleType": "HU",
            "WindowCenter": window[0],
            "WindowWidth": window[1],
            "AcquisitionNumber": 1,
        }
        if scanner.pixel_padding is not None:
            attrs["PixelPaddingValue"] = scanner.pixel_padding
        images = []
        for k in range(recon.n_slices):
            per = _geometry_attrs(stack, k, table)
            per["InstanceNumber"] = numbers[k]
            images.append((stored[k], per))
        thickness = f"{recon.slice_thickness:g}"
        name = kernel if isinstance(kernel, str) else kernel[0]
        series.append(
            Series(
                number=number,
                modality="CT",
                scanner=scanner,
                description=f"CTA {thickness} {name}",
                protocol_name=site.description("CT protocol"),
                attrs=attrs,
                images=images,
                signed=True,
                bits_stored=16,
                shuffled=shuffled,
            )
        )
    score = round(clot.diameter_mm, 2) if clot else 0.0
    return series, (("pe", y, score),)


def _mr_series(rng, settings, site, patient, plan, truth) -> tuple[list[Series], tuple]:
    a, y, low_field = patient.glioma_aggressiveness, truth.label, truth.flag
    scanner = sites.choose_scanner(
        rng, site, "MR", accept=lambda s: (s.field_strength < 2.0) == low_field
    )
    age = _age(patient, patient.visit_date(plan.visit))
    brain = phantoms.sample_brain(_rng(settings, _ANATOMY, patient.index), age, a)
    layers = phantoms.brain_layers(brain)
    protocols = sites.sample_mr_protocols(
        rng, site, scanner, settings.mr_size, settings.mr_slices, brain.glioma.center[2]
    )
    table = np.array([rng.normal(0, 3), rng.normal(-20, 10), rng.normal(40, 30)])
    top = 2**scanner.bits_stored - 1
    lo = -(2**15) if scanner.signed else 0
    series = []
    for number, protocol in enumerate(protocols, start=2):  # series 1 is the localizer
        image = physics.scan_mr(layers, protocol, scanner, rng)
        stored = np.clip(np.rint(image / scanner.rescale_slope), lo, top)
        stored = stored.astype(np.int16 if scanner.signed else np.uint16)
        stack = physics.mr_stack(protocol)
        numbers, shuffled = _stack_order(rng, protocol.n_slices, settings, descending=False)
        seq = protocol.sequence
        description = sites.mr_series_name(scanner.manufacturer, seq.name)
        attrs = {
            "BodyPartExamined": "HEAD" if scanner.manufacturer == sites.SIEMENS else "BRAIN",
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
            "ScanningSequence": seq.scanning_sequence.split("\\"),
            "SequenceVariant": seq.sequence_variant.split("\\"),
            "MRAcquisitionType": seq.acquisition,
            "RepetitionTime": protocol.tr,
            "EchoTime": protocol.te,
            "FlipAngle": protocol.flip,
            "MagneticFieldStrength": protocol.field_strength,
            "ImagingFrequency": round(42.577 * protocol.field_strength, 6),
            "SliceThickness": protocol.slice_thickness,
            "SpacingBetweenSlices": protocol.slice_spacing,
            "PixelSpacing": [round(protocol.pixel_spacing, 6)] * 2,
            "NumberOfAverages": protocol.averages,
            "PatientPosition": "HFS",
            "AcquisitionNumber": 1,
        }
        if protocol.ti is not None:
            attrs["InversionTime"] = protocol.ti
        if seq.contrast:
            attrs["ContrastBolusAgent"] = "GADOBUTROL"
            attrs["ContrastBolusRoute"] = "IV"
        if scanner.rescale_slope != 1.0:
            attrs["RescaleSlope"] = scanner.rescale_slope
            attrs["RescaleIntercept"] = 0.0
            attrs["RescaleType"] = "US"
        images = []
        for k in range(protocol.n_slices):
            per = _geometry_attrs(stack, k, table)
            per["InstanceNumber"] = numbers[k]
            images.append((stored[k], per))
        series.append(
            Series(
                number=number,
                modality="MR",
                scanner=scanner,
                description=description,
                protocol_name=description,
                attrs=attrs,
                images=images,
                signed=scanner.signed,
                bits_stored=scanner.bits_stored,
                shuffled=shuffled,
            )
        )
    return series, (("glioma_grade", y, a),)


def _us_series(rng, settings, site, patient, plan, truth) -> tuple[list[Series], tuple]:
    scanner = sites.choose_scanner(rng, site, "US")
    protocol = sites.sample_us_protocol(rng, scanner, settings.us_size, settings.us_frames)
    scene = phantoms.sample_abdomen_scene(rng, protocol.depth_mm)
    cine = physics.scan_us(scene, protocol, scanner, rng)
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = protocol.columns - 4, protocol.rows - 1
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = protocol.pixel_spacing / 10.0
    region.TransducerFrequency = int(protocol.frequency_mhz * 1000)  # kHz
    attrs = {
        "BodyPartExamined": "ABDOMEN",
        "ImageType": ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"],
        "TransducerData": protocol.transducer,
        "TransducerType": "CURVED LINEAR",
        "NumberOfFrames": protocol.frames,
        "FrameTime": protocol.frame_time_ms,
        "FrameIncrementPointer": 0x00181063,  # FrameTime
        "CineRate": int(round(1000 / protocol.frame_time_ms)),
        "SequenceOfUltrasoundRegions": DicomSequence([region]),
        "PlanarConfiguration": 0,
    }
    series = Series(
        number=1,
        modality="US",
        scanner=scanner,
        description="Abdomen cine",
        protocol_name="ABDOMEN",
        attrs=attrs,
        images=[(cine, {"InstanceNumber": 1})],
        signed=False,
        bits_stored=8,
        photometric="RGB",
    )
    return [series], ()


_SYNTHESIZE = {"XR": _radiograph_series, "CT": _ct_series, "MR": _mr_series, "US": _us_series}


# --------------------------------------------------------------------------------------------
# Writing


def _format_time(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _device_serial(site: Site, scanner: Scanner) -> str:
    return str(zlib.crc32(f"{site.name}/{scanner.model}".encode()) % 90000 + 10000)


def _series_dataset(site: Site, study: dict, series: Series, series_uid: str) -> Dataset:
    """The header shared by every instance of a series; instances overwrite their own fields."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASS[series.modality]
    for key, value in study.items():
        setattr(ds, key, value)
    ds.Modality = series.modality
    ds.Manufacturer = series.scanner.manufacturer
    ds.ManufacturerModelName = series.scanner.model
    ds.SoftwareVersions = series.scanner.software
    ds.DeviceSerialNumber = _device_serial(site, series.scanner)
    ds.StationName = f"{site.accession_prefix}{series.modality}{series.number:02d}"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.protocol_name
    for key, value in series.attrs.items():
        setattr(ds, key, value)
    rgb = series.photometric == "RGB"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = series.photometric
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, series: Series, syntax: str) -> None:
    """Pixel module attributes and Pixel Data, native or encapsulated as the syntax says."""
    rgb = series.photometric == "RGB"
    ds.Rows, ds.Columns = int(pixels.shape[-3 if rgb else -2]), int(pixels.shape[-2 if rgb else -1])
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = series.bits_stored
    ds.HighBit = series.bits_stored - 1
    ds.PixelRepresentation = int(series.signed)
    if not rgb and series.modality in ("CT", "MR"):
        vr = "SS" if series.signed else "US"
        ds.add_new(0x00280106, vr, int(pixels.min()))  # SmallestImagePixelValue
        ds.add_new(0x00280107, vr, int(pixels.max()))  # LargestImagePixelValue
    native = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    if syntax == RLELossless:
        frames = native if native.ndim == (4 if rgb else 3) else native[None]
        ds.add_new(0x7FE00010, "OB", encapsulate([rle_encode_frame(f) for f in frames]))
    else:
        ds.add_new(0x7FE00010, "OW" if ds.BitsAllocated > 8 else "OB", native.tobytes())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    if syntax not in (ExplicitVRLittleEndian, RLELossless):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(syntax, generate_instance_uid=False)  # JPEG 2000 via pylibjpeg-openjpeg
    ds.file_meta.TransferSyntaxUID = syntax


def packbits_plane(plane: np.ndarray) -> bytes:
    """PackBits one byte plane (rows, cols), each row separately, as DICOM RLE requires.

    Runs of 3 or more equal bytes become replicate pieces (header 257 - n, one byte), the rest
    literal pieces (header n - 1, n bytes); pieces hold at most 128 bytes. Vectorized: every
    byte is assigned to a piece at once, then headers and kept bytes are scattered into place.
    """
    rows, cols = plane.shape
    flat = plane.ravel()
    n = flat.size
    index = np.arange(n)
    row_start = index % cols == 0
    run_start = row_start.copy()
    run_start[1:] |= flat[1:] != flat[:-1]
    run_id = np.cumsum(run_start) - 1
    replicate = (np.bincount(run_id) >= 3)[run_id]
    # Groups: maximal literal stretches and single replicate runs, never crossing a row.
    group_start = row_start | (replicate & run_start)
    group_start[1:] |= replicate[1:] != replicate[:-1]
    group_first = np.flatnonzero(group_start)
    group_id = np.cumsum(group_start) - 1
    group_len = np.diff(np.append(group_first, n))
    # A replicate piece cannot hold 1 byte: when a run would leave one over, cut by 127.
    chunk = np.where(replicate[group_first] & (group_len % 128 == 1), 127, 128)[group_id]
    piece_start = (index - group_first[group_id]) % chunk == 0
    piece_first = np.flatnonzero(piece_start)
    piece_len = np.diff(np.append(piece_first, n))
    header = np.where(replicate[piece_first], 257 - piece_len, piece_len - 1).astype(np.uint8)
    keep = ~replicate | piece_start
    width = piece_start.astype(np.int64) + keep
    position = np.cumsum(width) - width
    out = np.zeros(int(width.sum()) + 1, dtype=np.uint8)  # + 1: room to pad to even length
    out[position[piece_start]] = header
    out[position[keep] + piece_start[keep]] = flat[keep]
    size = int(width.sum())
    return out[: size + size % 2].tobytes()


def rle_encode_frame(frame: np.ndarray) -> bytes:
    """One frame in DICOM RLE Lossless (PS3.5 Annex G): a 64-byte header, then one PackBits
    segment per sample and byte (most significant first), each row encoded separately.

    pydicom's own encoder is pure Python and takes ~30 ms per 128x128 CT slice; this one finds
    runs with numpy and is an order of magnitude faster. Tests decode it with pydicom.
    """
    planes = frame if frame.ndim == 3 else frame[..., None]  # (rows, cols, samples)
    rows, cols, samples = planes.shape
    size = planes.dtype.itemsize
    big = np.ascontiguousarray(planes, dtype=planes.dtype.newbyteorder(">")).view(np.uint8)
    big = big.reshape(rows, cols, samples, size)
    segments = [
        packbits_plane(big[:, :, sample, byte]) for sample in range(samples) for byte in range(size)
    ]
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header = np.zeros(16, dtype="<u4")
    header[0] = len(segments)
    header[1 : 1 + len(segments)] = offsets
    return header.tobytes() + b"".join(segments)


def _study_attrs(settings, site, patient, plan, start_s: int) -> dict:
    """Patient and study header attributes: the fake PHI a de-identifier must remove."""
    date = patient.visit_date(plan.visit)
    number = (plan.index * 7727 + 31337) % 1_000_000
    staff = _rng(settings, _STAFF, plan.index)  # names of the referrer and the technologist
    referring, operator = (
        f"{staff.choice(_FAMILY)}^{staff.choice(_GIVEN[str(staff.choice(['F', 'M']))])}"
        for _ in range(2)
    )
    return {
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date.strftime("%Y%m%d"),
        "PatientSex": patient.sex,
        "PatientAge": f"{_age(patient, date):03d}Y",
        "StudyInstanceUID": _uid(settings, "study", plan.index),
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": _format_time(start_s),
        "StudyID": str(plan.index % 100000 + 1),
        "AccessionNumber": f"{site.accession_prefix}{date:%y}{number:06d}",
        "InstitutionName": site.institution,
        "ReferringPhysicianName": referring,
        "OperatorsName": operator,
    }


def write_study(settings: SynthSettings, plan: StudyPlan, out_dir: Path) -> StudyRecord:
    """Synthesize one study and write its files; returns its record."""
    site = settings.sites[plan.site]
    patient = make_patient(settings, plan.patient, plan.site)
    rng = _rng(settings, _STUDY, plan.index)
    truth = draw_truth(rng, settings, site, patient, plan.kind)
    start = int(rng.integers(7 * 3600, 20 * 3600))
    study = _study_attrs(settings, site, patient, plan, start)
    series_list, labels = _SYNTHESIZE[plan.kind](rng, settings, site, patient, plan, truth)
    kind = series_list[0].attrs.get("ViewPosition", plan.kind)
    study["StudyDescription"] = site.description(kind)

    # Real PACS free text sometimes carries the patient's name; the de-identifier must catch it.
    leak = bool(rng.random() < settings.phi_in_description)
    if leak:
        name = f"{patient.family} {patient.given.split('^')[0]}"
        if rng.random() < 0.5:
            study["StudyDescription"] = f"{study['StudyDescription']} {name}"
        else:
            series_list[0].description = f"{series_list[0].description} {patient.name}"

    syntax = site.radiograph_transfer_syntax if plan.kind == "XR" else site.transfer_syntax
    study_dir = out_dir / "dicom" / site.name / patient.patient_id / study["StudyInstanceUID"]
    frame_of_reference = _uid(settings, "frame", plan.index)
    date = study["StudyDate"]
    n_instances = 0
    for s in series_list:
        ds = _series_dataset(site, study, s, _uid(settings, "series", plan.index, s.number))
        series_time = start + 60 * (2 + 3 * s.number)
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.SeriesTime = _format_time(series_time)
        if s.modality in ("CT", "MR"):
            ds.FrameOfReferenceUID = frame_of_reference
            ds.PositionReferenceIndicator = ""
        series_dir = study_dir / str(s.number)
        series_dir.mkdir(parents=True, exist_ok=True)
        for pixels, per in s.images:
            number = per["InstanceNumber"]
            ds.SOPInstanceUID = _uid(settings, "instance", plan.index, s.number, number)
            for key, value in per.items():
                setattr(ds, key, value)
            ds.AcquisitionTime = ds.ContentTime = _format_time(series_time + number)
            ds.file_meta = _file_meta(ds)
            _set_pixels(ds, pixels, s, syntax)
            ds.save_as(series_dir / f"{number}.dcm", enforce_file_format=True)
            n_instances += 1
    return StudyRecord(
        index=plan.index,
        site=site.name,
        modality=series_list[0].modality,
        patient=plan.patient,
        study_uid=study["StudyInstanceUID"],
        labels=labels,
        flag=truth.flag,
        manufacturers=tuple(sorted({s.scanner.manufacturer for s in series_list})),
        models=tuple(sorted({s.scanner.model for s in series_list})),
        transfer_syntax=syntax,
        n_series=len(series_list),
        n_instances=n_instances,
        phi_in_description=leak,
        shuffled_series=sum(s.shuffled for s in series_list),
    )


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PGJAX_SYNTH_1"
    return meta


# --------------------------------------------------------------------------------------------
# The corpus


def _write_study_job(job) -> StudyRecord:
    settings, plan, out_dir = job
    return write_study(settings, plan, Path(out_dir))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        manifest = out / "corpus.json"
        if not overwrite:
            raise ValueError(
                f"{out}: folder is not empty; choose a new folder, or pass overwrite "
                "(--overwrite) to replace a synthetic corpus written there before"
            )
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if not isinstance(previous, dict) or previous.get("format") != CORPUS_FORMAT:
            raise ValueError(
                f"{out}: not a pgjax synthetic corpus (no valid corpus.json); refusing to "
                "delete anything there"
            )
        shutil.rmtree(out / "dicom", ignore_errors=True)
        for name in ("labels.csv", "site_names.csv", "corpus.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_corpus(
    out_dir,
    *,
    studies: int,
    seed: int = 0,
    shortcut: float = 1.0,
    sites=None,
    n_sites: int | None = None,
    external_sites=None,
    modality_mix: tuple[float, float, float, float] = (0.5, 0.25, 0.2, 0.05),
    radiograph_size: int = 256,
    ct_size: int = 128,
    ct_slices: tuple[int, int] = (24, 40),
    mr_size: int = 128,
    mr_slices: tuple[int, int] = (16, 24),
    us_size: int = 128,
    us_frames: int = 8,
    phi_in_description: float = 0.02,
    repeat_patients: float = 0.3,
    shuffled_series: float = 0.1,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write a synthetic corpus to out_dir; returns the summary also written to corpus.json.

    sites: a site file (.toml or .json, see sitefile.py) or Site objects; None: the default
    file. n_sites keeps its first n; external_sites (names) overrides which sites are external.
    See SynthSettings for the other knobs and the module docstring for the layout. workers > 1
    uses a spawn-context process pool; the output does not depend on it.
    """
    chosen = sitefile.select_sites(
        sites, n_sites, None if external_sites is None else tuple(external_sites)
    )
    if sites is None:
        site_file = "default"
    else:
        site_file = Path(sites).name if isinstance(sites, str | Path) else "given"
    settings = SynthSettings(
        studies=studies,
        seed=seed,
        shortcut=shortcut,
        sites=chosen,
        site_file=site_file,
        modality_mix=tuple(modality_mix),
        radiograph_size=radiograph_size,
        ct_size=ct_size,
        ct_slices=tuple(ct_slices),
        mr_size=mr_size,
        mr_slices=tuple(mr_slices),
        us_size=us_size,
        us_frames=us_frames,
        phi_in_description=phi_in_description,
        repeat_patients=repeat_patients,
        shuffled_series=shuffled_series,
    )
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    # Marks the folder as ours from the start, so that a run that dies half way can be
    # replaced with overwrite; the summary below replaces it.
    marker = {"format": CORPUS_FORMAT, "version": CORPUS_VERSION, "complete": False}
    (out / "corpus.json").write_text(json.dumps(marker) + "\n")
    plans = plan_corpus(settings)
    jobs = [(settings, p, str(out)) for p in plans]
    bar = None
    if progress:
        from pgjax.progress import Progress

        bar = Progress(len(jobs), "synth", unit="studies")
    records: list[StudyRecord] = []
    if workers == 1:
        for job in jobs:
            records.append(_write_study_job(job))
            if bar:
                bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, min(16, len(jobs) // (4 * workers)))
            for record in pool.map(_write_study_job, jobs, chunksize=chunk):
                records.append(record)
                if bar:
                    bar.update()
    records.sort(key=lambda r: r.index)
    _write_labels(out / "labels.csv", records)
    _write_site_names(out / "site_names.csv", settings)
    summary = summarize(settings, records)
    (out / "corpus.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _write_labels(path: Path, records: list[StudyRecord]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["study_uid", "task", "label", "score"])
        for r in records:
            for task, label, score in r.labels:
                writer.writerow([r.study_uid, task, label, f"{score:.4f}"])


def _write_site_names(path: Path, settings: SynthSettings) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["folder", "site"])
        for site in settings.sites:
            writer.writerow([site.name, site.name])


def _site_design(site: Site, shortcut: float) -> dict:
    """What a site file set for a site, without its identifiers (institution, ID formats)."""
    xr = site.scanners("XR")
    return {
        "share": site.share,
        "radiograph_models": sorted({scanner.model for scanner, w in xr if w > 0}),
        "radiograph_vendors": sorted({scanner.manufacturer for scanner, w in xr if w > 0}),
        "pa_kvp": list(site.pa_kvp),
        "ap_kvp": list(site.ap_kvp),
        "ctr_mean": site.ctr_mean,
        "ctr_sd": site.ctr_sd,
        "reading_sd": site.reading_sd,
        "label_noise": site.label_noise,
    }


def summarize(settings: SynthSettings, records: list[StudyRecord]) -> dict:
    """Counts and rates of a corpus (the contents of corpus.json); no identifiers."""
    by_site: dict[str, dict] = {}
    for site in settings.sites:
        rows = [r for r in records if r.site == site.name]
        tasks: dict[str, dict] = {}
        for task in sites.TASKS.values():
            labelled = [(r, lab) for r in rows for t, lab, _ in r.labels if t == task]
            pos = [r.flag for r, lab in labelled if lab == 1]
            neg = [r.flag for r, lab in labelled if lab == 0]
            tasks[task] = {
                "studies": len(labelled),
                "positives": len(pos),
                "prevalence": round(len(pos) / len(labelled), 4) if labelled else None,
                "expected_prevalence": round(sites.site_prevalence(task, site), 4),
                "p_flag_given_positive": round(float(np.mean(pos)), 4) if pos else None,
                "p_flag_given_negative": round(float(np.mean(neg)), 4) if neg else None,
                "expected_p_flag_given_positive": round(
                    sites.flag_probability(1, task, site, settings.shortcut), 4
                ),
                "expected_p_flag_given_negative": round(
                    sites.flag_probability(0, task, site, settings.shortcut), 4
                ),
            }
        by_site[site.name] = {
            "role": site.role,
            "shift": site.shift,
            "external": site.external,
            "design": _site_design(site, settings.shortcut),
            "studies": len(rows),
            "patients": len({r.patient for r in rows}),
            "modalities": dict(sorted(Counter(r.modality for r in rows).items())),
            "vendors": dict(sorted(Counter(m for r in rows for m in r.manufacturers).items())),
            "tasks": tasks,
        }
    label_counts: dict[str, dict[str, int]] = defaultdict(lambda: {"0": 0, "1": 0})
    for r in records:
        for task, label, _ in r.labels:
            label_counts[task][str(label)] += 1
    visits = Counter(r.patient for r in records)

    def tally(values) -> dict:
        return dict(sorted(Counter(values).items()))

    return {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "complete": True,
        "seed": settings.seed,
        "settings": {
            **{
                f.name: getattr(settings, f.name)
                for f in dataclasses.fields(settings)
                if f.name != "sites"
            },
            "sites": [s.name for s in settings.sites],
        },
        "generator": {"pydicom": pydicom.__version__, "numpy": np.__version__},
        "files": {
            "dicom": "dicom/<site>/<PatientID>/<StudyInstanceUID>/<SeriesNumber>/<Instance>.dcm",
            "labels": "labels.csv",
        },
        "totals": {
            "studies": len(records),
            "patients": len(visits),
            "patients_with_several_studies": sum(1 for n in visits.values() if n > 1),
            "series": sum(r.n_series for r in records),
            "instances": sum(r.n_instances for r in records),
            "studies_with_name_in_description": sum(r.phi_in_description for r in records),
            "shuffled_series": sum(r.shuffled_series for r in records),
        },
        "counts": {
            "site": tally(r.site for r in records),
            "modality": tally(r.modality for r in records),
            "vendor": tally(m for r in records for m in r.manufacturers),
            "model": tally(m for r in records for m in r.models),
            "transfer_syntax": tally(pydicom.uid.UID(r.transfer_syntax).name for r in records),
            "label": {task: label_counts[task] for task in sorted(label_counts)},
        },
        "external_sites": [s.name for s in settings.sites if s.external],
        "shift_types": {s.name: s.shift for s in settings.sites if s.external},
        "protocol_flags": FLAG_MEANING,
        "sites": by_site,
    }
