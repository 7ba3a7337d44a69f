"""Sites, vendors, scanner models, and the protocol distributions each site draws from.

A site is a hospital: a fleet of scanners with its own vendor mix, house protocols (kVp, mAs,
grid, slice thickness, MR sequence menus), naming habits for descriptions, a storage convention
(transfer syntax, MONOCHROME1, VOI window or LUT), a patient-ID format, a case mix and a view
mix. Sites are read from a site file (sitefile.py; the default is default_sites.toml). Everything
here is invented; names of real products are used because real headers carry them.

The protocol/label association: at every site one protocol choice (the "flag": AP view for
radiographs, sharp primary kernel for CT, 1.5 T for brain MR) is taken more often for positives,
as sicker patients are imaged at the bedside. The flag acts on the image through physics (an AP
film magnifies the heart), never by flipping labels. Its strength per site comes from the site
file, scaled by the `shortcut` knob; only a site whose shift is "reversal" takes the flag more
often for negatives (the explicit spurious-correlation reversal).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SIEMENS, GE, PHILIPS = "SIEMENS", "GE MEDICAL SYSTEMS", "Philips"
VENDORS = (SIEMENS, GE, PHILIPS)

TASKS = {"XR": "cardiomegaly", "CT": "pe", "MR": "glioma_grade"}
CTR_THRESHOLD = 0.5  # cardiomegaly: a read cardiothoracic ratio above it
CTR_LIMITS = (0.33, 0.75)  # the latent's plausible range; draws are clipped to it
ROLES = ("training", "external")
SHIFTS = ("none", "acquisition", "case_mix", "reversal")


@dataclasses.dataclass(frozen=True)
class Scanner:
    """One scanner model as it writes its headers and images.

    modality: CT, MR, XR (radiography; the site decides CR or DX) or US.
    rescale_intercept / outside_fov_hu / hu_offset: CT storage convention and calibration error.
    noise_grain: CT/radiograph noise texture; below 1 is coarser (iterative reconstruction).
    bits_stored / gain / rescale_slope: how the vendor scales arbitrary-unit images.
    unsharp: radiograph processing, the strength of the vendor's unsharp mask.
    kernels: CT kernel class (smooth, standard, sharp) -> ConvolutionKernel value(s).
    """

    manufacturer: str
    model: str
    modality: str
    software: str
    field_strength: float = 0.0
    portable: bool = False
    rescale_intercept: float = -1024.0
    outside_fov_hu: float = -1024.0
    pixel_padding: int | None = None
    hu_offset: float = 0.0
    noise_grain: float = 1.0
    bits_stored: int = 12
    signed: bool = False
    gain: float = 1.0
    rescale_slope: float = 1.0
    transducer: str = ""
    unsharp: float = 0.6
    kernels: tuple[tuple[str, str | tuple[str, ...]], ...] = ()

    def kernel_name(self, kernel_class: str) -> str | tuple[str, ...]:
        return dict(self.kernels)[kernel_class]


def _kernels(smooth, standard, sharp):
    return (("smooth", smooth), ("standard", standard), ("sharp", sharp))


# The scanner catalogue: 3 vendors, 2-3 models per vendor and modality.
# fmt: off
SCANNERS = {s.model: s for s in (
    Scanner(SIEMENS, "SOMATOM Definition AS+", "CT", "syngo CT VA48A", hu_offset=3.0,
            kernels=_kernels("B30f", "B45f", "B70f")),
    # Stores HU + 8192 ("offset pixels"); outside the reconstruction circle it writes 0.
    Scanner(SIEMENS, "SOMATOM Force", "CT", "syngo CT VB10A", rescale_intercept=-8192.0,
            outside_fov_hu=-8192.0, hu_offset=-2.0, noise_grain=0.85,
            kernels=_kernels(("Br36d", "3"), ("Br44d", "3"), ("Bl64d", "3"))),
    # GE pads outside the reconstruction circle with -2000 (PixelPaddingValue), -3024 HU.
    Scanner(GE, "Revolution CT", "CT", "revo_ct_22MW.30", outside_fov_hu=-3024.0,
            pixel_padding=-2000, hu_offset=5.0, noise_grain=0.9,
            kernels=_kernels("SOFT", "STANDARD", "LUNG")),
    Scanner(GE, "LightSpeed VCT", "CT", "LightSpeedverrel", outside_fov_hu=-3024.0,
            pixel_padding=-2000, hu_offset=-4.0, noise_grain=1.1,
            kernels=_kernels("SOFT", "STANDARD", "BONE")),
    Scanner(PHILIPS, "iCT 256", "CT", "4.1.2", hu_offset=1.0, noise_grain=0.95,
            kernels=_kernels("A", "B", "YA")),
    Scanner(PHILIPS, "Ingenuity CT", "CT", "4.1.6", hu_offset=8.0, noise_grain=1.05,
            kernels=_kernels("B", "C", "L")),
    Scanner(SIEMENS, "Avanto", "MR", "syngo MR B17", field_strength=1.5, gain=3200.0),
    Scanner(SIEMENS, "Skyra", "MR", "syngo MR E11", field_strength=3.0, gain=2600.0),
    Scanner(GE, "SIGNA HDxt", "MR", "HD16.0_V02_1131.a", field_strength=1.5, gain=9000.0,
            bits_stored=16, signed=True),
    Scanner(GE, "DISCOVERY MR750", "MR", "DV25.0_R02_1549.b", field_strength=3.0, gain=7000.0,
            bits_stored=16, signed=True),
    # Philips stores MR values divided by a rescale slope.
    Scanner(PHILIPS, "Ingenia", "MR", "5.3.1", field_strength=1.5, gain=2000.0,
            rescale_slope=1.45),
    Scanner(PHILIPS, "Achieva", "MR", "3.2.3", field_strength=3.0, gain=1800.0,
            rescale_slope=1.72),
    Scanner(SIEMENS, "Ysio Max", "XR", "VF10B", bits_stored=12, gain=0.24),
    Scanner(SIEMENS, "Mobilett Mira Max", "XR", "VF11A", portable=True, bits_stored=12,
            gain=0.24, noise_grain=0.9),
    Scanner(GE, "Discovery XR656", "XR", "dm_Platform_release_FW", bits_stored=14, gain=0.2),
    Scanner(GE, "Optima XR220amx", "XR", "ads_Platform_release_FW", portable=True,
            bits_stored=14, gain=0.2, noise_grain=1.1),
    Scanner(PHILIPS, "DigitalDiagnost", "XR", "4.3.4", bits_stored=10, gain=0.27),
    Scanner(PHILIPS, "PCR Eleva S", "XR", "1.1.2", portable=True, bits_stored=10, gain=0.27,
            noise_grain=0.8),
    Scanner(SIEMENS, "ACUSON S2000", "US", "VB10", transducer="6C1 HD", gain=1.0),
    Scanner(GE, "LOGIQ E9", "US", "R6.1.0", transducer="C1-6-D", gain=1.1),
    Scanner(PHILIPS, "EPIQ 7G", "US", "7.0.2", transducer="C5-1", gain=0.95),
)}
# fmt: on


@dataclasses.dataclass(frozen=True)
class MRSequence:
    """A brain MR sequence: signal model, header codes and parameter ranges (ms, degrees)."""

    name: str
    weighting: str  # "se" (spin echo), "ir" (inversion recovery), "gre" (spoiled gradient echo)
    scanning_sequence: str
    sequence_variant: str
    acquisition: str  # MRAcquisitionType
    tr: tuple[float, float]
    te: tuple[float, float]
    ti: tuple[float, float] | None
    flip: tuple[float, float]
    thickness: tuple[float, ...]
    contrast: bool = False


# fmt: off
MR_SEQUENCES = {s.name: s for s in (
    # name, signal model, ScanningSequence, SequenceVariant, MRAcquisitionType, TR, TE,
    # TI (ms), flip angle (degrees), slice thickness choices (mm)
    MRSequence("T1", "se", "SE", "SK\\SP", "2D", (450, 650), (8, 15),
               None, (90, 90), (4.0, 5.0, 6.0)),
    MRSequence("T1C", "se", "SE", "SK\\SP", "2D", (450, 650), (8, 15),
               None, (90, 90), (4.0, 5.0, 6.0), contrast=True),
    MRSequence("T1C_3D", "gre", "GR", "SP", "3D", (7, 25), (2.5, 5.0),
               None, (12, 30), (2.0, 2.5, 3.0), contrast=True),
    MRSequence("T2", "se", "SE", "SK\\SP\\OSP", "2D", (3000, 6000), (80, 120),
               None, (90, 150), (4.0, 5.0, 6.0)),
    MRSequence("FLAIR", "ir", "SE\\IR", "SK\\SP\\MP", "2D", (8000, 11000), (90, 140),
               (2300, 2700), (90, 150), (4.0, 5.0, 6.0)),
)}
# fmt: on

# How each vendor names the series (SeriesDescription and ProtocolName follow house style).
MR_SERIES_NAMES = {
    SIEMENS: {
        "T1": "t1_se_tra",
        "T1C": "t1_se_tra_KM",
        "T1C_3D": "t1_fl3d_tra_KM",
        "T2": "t2_tse_tra",
        "FLAIR": "t2_tirm_tra_dark-fluid",
    },
    GE: {
        "T1": "AX T1",
        "T1C": "AX T1 +C",
        "T1C_3D": "AX 3D SPGR +C",
        "T2": "AX T2 FSE",
        "FLAIR": "AX T2 FLAIR",
    },
    PHILIPS: {
        "T1": "T1W_SE",
        "T1C": "T1W_SE_GD",
        "T1C_3D": "T1W_3D_FFE_GD",
        "T2": "T2W_TSE",
        "FLAIR": "T2W_FLAIR",
    },
}


def mr_series_name(manufacturer: str, sequence: str) -> str:
    """A series description in the vendor's house style; a vendor a site file adds gets the
    sequence's own name."""
    return MR_SERIES_NAMES.get(manufacturer, {}).get(sequence, sequence)


@dataclasses.dataclass(frozen=True)
class Site:
    """A hospital: its fleet, house protocols, naming habits, storage conventions, case mix and
    view mix. Built from a site file by sitefile.py, which documents every field."""

    name: str
    role: str  # "training" or "external"
    shift: str  # what an external site shifts: "none", "acquisition", "case_mix", "reversal"
    institution: str
    patient_id_format: str  # str.format pattern for a 7-digit number
    accession_prefix: str
    share: float  # relative share of the corpus's studies
    fleet: tuple[tuple[Scanner, float], ...]  # (scanner, weight within its modality)
    transfer_syntax: str  # CT, MR and US
    radiograph_modality: str  # "DX" or "CR"
    monochrome1: bool
    voi: str  # "window", "lut" or "none"
    radiograph_transfer_syntax: str
    pa_kvp: tuple[float, float]
    ap_kvp: tuple[float, float]
    pa_mas: tuple[float, float]
    ap_mas: tuple[float, float]
    pa_grid: bool
    ap_grid: bool
    p_ap: tuple[float, float]  # P(AP view | negative), P(AP view | positive)
    ctr_mean: float  # the latent cardiothoracic ratio ~ Normal(mean, sd), clipped to CTR_LIMITS
    ctr_sd: float
    reading_sd: float  # the reader's error on the ratio before thresholding it
    label_noise: float  # a fraction of reads whose label is flipped outright
    pe_prevalence: float
    glioma_prevalence: float
    ct_kvp: tuple[tuple[float, float], ...]  # (kVp, weight)
    ct_thickness: tuple[float, ...]
    ct_second_recon: float
    p_sharp: tuple[float, float]  # P(sharp primary kernel | negative), (... | positive)
    mr_menus: tuple[tuple[tuple[str, ...], float], ...]
    mr_rectangular: bool
    p_low_field: tuple[float, float]  # P(1.5 T | negative), (... | positive)
    descriptions: tuple[tuple[str, str], ...]  # study kind -> StudyDescription

    @property
    def external(self) -> bool:
        return self.role == "external"

    def scanners(self, modality: str) -> list[tuple[Scanner, float]]:
        return [(s, w) for s, w in self.fleet if s.modality == modality]

    def description(self, kind: str) -> str:
        return dict(self.descriptions)[kind]

    def flag_probabilities(self, task: str) -> tuple[float, float]:
        """P(flag | negative), P(flag | positive) as the site file gives them."""
        flags = {"cardiomegaly": self.p_ap, "pe": self.p_sharp, "glioma_grade": self.p_low_field}
        return flags[task]


# --------------------------------------------------------------------------------------------
# Case mix and the protocol/label association


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def site_prevalence(task: str, site: Site) -> float:
    """Expected prevalence of a finding at a site. Cardiomegaly: P(read ratio > threshold) under
    the site's latent distribution and reading error (clipping ignored), then label noise."""
    if task == "pe":
        return site.pe_prevalence
    if task == "glioma_grade":
        return site.glioma_prevalence
    spread = math.hypot(site.ctr_sd, site.reading_sd)
    if spread > 0:
        p = _normal_cdf((site.ctr_mean - CTR_THRESHOLD) / spread)
    else:
        p = float(site.ctr_mean > CTR_THRESHOLD)
    return p * (1 - site.label_noise) + (1 - p) * site.label_noise


def flag_probability(label: int, task: str, site: Site, shortcut: float) -> float:
    """P(protocol flag | label) at a site. shortcut scales the site file's association: 1 takes
    it as written, 0 removes it (both labels get the midpoint of the two probabilities)."""
    negative, positive = site.flag_probabilities(task)
    middle = (negative + positive) / 2
    return middle + shortcut * ((positive if label else negative) - middle)


# --------------------------------------------------------------------------------------------
# Scanners


def _pick(rng: np.random.Generator, items, weights):
    w = np.asarray(weights, dtype=float)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def choose_scanner(rng: np.random.Generator, site: Site, modality: str, accept=None) -> Scanner:
    """A scanner of the site's fleet for a modality, by fleet weight; accept() filters."""
    fleet = [(s, w) for s, w in site.scanners(modality) if w > 0 and (accept is None or accept(s))]
    if not fleet:  # the site lacks such a scanner (e.g. no 1.5 T): any of the modality
        fleet = [(s, w) for s, w in site.scanners(modality) if w > 0]
    if not fleet:
        raise ValueError(f"{site.name} has no {modality} scanner")
    return _pick(rng, [s for s, _ in fleet], [w for _, w in fleet])


# --------------------------------------------------------------------------------------------
# Protocols


@dataclasses.dataclass(frozen=True)
class CTAcquisition:
    kvp: float
    tube_current_ma: int
    rotation_s: float
    contrast_agent: str

    @property
    def exposure_mas(self) -> int:
        return int(round(self.tube_current_ma * self.rotation_s))


@dataclasses.dataclass(frozen=True)
class CTRecon:
    """One reconstruction of a CT acquisition: kernel, slices and field of view (mm)."""

    kernel_class: str
    slice_thickness: float
    slice_spacing: float
    n_slices: int
    fov_mm: float
    matrix: int
    z_center: float  # phantom coordinates

    @property
    def pixel_spacing(self) -> float:
        return self.fov_mm / self.matrix

    @property
    def z_range(self) -> tuple[float, float]:
        half = (self.n_slices - 1) * self.slice_spacing / 2 + self.slice_thickness / 2
        return self.z_center - half, self.z_center + half


def sample_ct_protocol(
    rng: np.random.Generator,
    site: Site,
    sharp_primary: bool,
    body_width_mm: float,
    matrix: int,
    slices: tuple[int, int],
) -> tuple[CTAcquisition, tuple[CTRecon, ...]]:
    """A CT pulmonary angiogram: one acquisition, one or two reconstructions.

    The primary reconstruction uses a sharp kernel when sharp_primary (the shortcut flag),
    otherwise a standard or smooth one; a second reconstruction, when there is one, uses the
    other family and a different slice thickness from the same raw data.
    """
    kvp = _pick(rng, [k for k, _ in site.ct_kvp], [w for _, w in site.ct_kvp])
    # The exposure (mAs) is what the protocol targets; lower kVp protocols raise it to keep the
    # noise in check, and a faster rotation needs a higher tube current for the same mAs.
    target_mas = rng.uniform(80, 250) * (120.0 / kvp) ** 1.2
    rotation = float(rng.choice([0.28, 0.33, 0.5]))
    ma = int(round(target_mas / rotation / 5) * 5)
    agent = str(rng.choice(["OMNIPAQUE 350", "ISOVUE 370", "ULTRAVIST 370", "VISIPAQUE 320"]))
    acquisition = CTAcquisition(kvp, ma, rotation, agent)

    fov = float(np.clip(body_width_mm + rng.uniform(15, 60), 280, 460))
    fov = round(fov / 5) * 5.0
    smooth_or_standard = "smooth" if rng.random() < 0.3 else "standard"
    classes = ["sharp", smooth_or_standard] if sharp_primary else [smooth_or_standard, "sharp"]
    n_recons = 2 if rng.random() < site.ct_second_recon else 1
    thicknesses = list(rng.permutation(site.ct_thickness))
    z_center = float(rng.normal(-10.0, 10.0))
    recons = []
    for kernel_class, thickness in zip(classes[:n_recons], thicknesses, strict=False):
        thickness = float(thickness)
        n = int(rng.integers(slices[0], slices[1] + 1))
        # Thin slices are often reconstructed overlapping; thick ones contiguous.
        spacing = thickness * (0.8 if thickness <= 1.5 and rng.random() < 0.5 else 1.0)
        recons.append(CTRecon(kernel_class, thickness, round(spacing, 3), n, fov, matrix, z_center))
    return acquisition, tuple(recons)


@dataclasses.dataclass(frozen=True)
class MRSeriesProtocol:
    sequence: MRSequence
    field_strength: float
    tr: float
    te: float
    ti: float | None
    flip: float
    slice_thickness: float
    slice_spacing: float
    n_slices: int
    rows: int
    columns: int
    pixel_spacing: float
    tilt_deg: float  # oblique angulation about the left-right axis
    averages: int
    z_center: float  # phantom coordinates


def sample_mr_protocols(
    rng: np.random.Generator,
    site: Site,
    scanner: Scanner,
    matrix: int,
    slices: tuple[int, int],
    lesion_z: float,
) -> tuple[MRSeriesProtocol, ...]:
    """The series of one brain MR study, from one of the site's sequence menus.

    The slab is centred near the lesion so that thin 3D slabs still cover it.
    """
    menu = _pick(rng, [m for m, _ in site.mr_menus], [w for _, w in site.mr_menus])
    b0 = scanner.field_strength
    fov = float(rng.choice([220.0, 230.0, 240.0]))
    rows = int(round(matrix * 0.875 / 2) * 2) if site.mr_rectangular else matrix
    tilt = float(rng.uniform(-12, 12)) if rng.random() < 0.3 else 0.0
    protocols = []
    for name in menu:
        seq = MR_SEQUENCES[name]
        tr = float(rng.uniform(*seq.tr))
        te = float(rng.uniform(*seq.te))
        ti = None
        if seq.ti is not None:
            # FLAIR nulls CSF: TI near T1_csf * ln 2, which barely moves with field strength.
            ti = float(rng.uniform(*seq.ti))
        flip = float(rng.uniform(*seq.flip))
        thickness = float(rng.choice(seq.thickness))
        gap = 0.0 if seq.acquisition == "3D" else float(rng.choice([0.0, 0.1, 0.2, 0.3]))
        protocols.append(
            MRSeriesProtocol(
                sequence=seq,
                field_strength=b0,
                tr=round(tr, 1),
                te=round(te, 2),
                ti=None if ti is None else round(ti, 1),
                flip=round(flip),
                slice_thickness=thickness,
                slice_spacing=round(thickness * (1 + gap), 3),
                n_slices=int(rng.integers(slices[0], slices[1] + 1)),
                rows=rows,
                columns=matrix,
                pixel_spacing=fov / matrix,
                tilt_deg=tilt,
                averages=int(rng.choice([1, 2])) if seq.acquisition == "2D" else 1,
                z_center=float(lesion_z + rng.normal(0, 4.0)),
            )
        )
    return tuple(protocols)


@dataclasses.dataclass(frozen=True)
class RadiographProtocol:
    view: str  # PA or AP
    kvp: float
    tube_current_ma: int
    exposure_time_ms: int
    sid_mm: float
    detector_mm: float
    matrix: int
    grid: bool

    @property
    def exposure_mas(self) -> float:
        return self.tube_current_ma * self.exposure_time_ms / 1000.0

    @property
    def pixel_spacing(self) -> float:
        return self.detector_mm / self.matrix


def sample_radiograph_protocol(
    rng: np.random.Generator, site: Site, ap_view: bool, matrix: int
) -> RadiographProtocol:
    """A frontal chest radiograph: PA in the department, or AP at the bedside (portable: short
    SID, a small detector, usually no grid), with the site's kVp and mAs ranges for the view."""
    kvp_range, mas_range = (site.ap_kvp, site.ap_mas) if ap_view else (site.pa_kvp, site.pa_mas)
    kvp = float(round(rng.uniform(*kvp_range)))
    # The generator sets mAs; the tube current is one of a few settings and the time follows.
    ma = int(rng.choice([100, 125, 160] if ap_view else [250, 320, 400]))
    time_ms = max(1, int(round(rng.uniform(*mas_range) * 1000.0 / ma)))
    if ap_view:
        sid, detector = float(rng.choice([1000.0, 1016.0])), float(rng.choice([350.0, 384.0]))
        return RadiographProtocol("AP", kvp, ma, time_ms, sid, detector, matrix, site.ap_grid)
    detector = float(rng.choice([410.0, 430.0]))
    return RadiographProtocol("PA", kvp, ma, time_ms, 1800.0, detector, matrix, site.pa_grid)


@dataclasses.dataclass(frozen=True)
class USProtocol:
    transducer: str
    frequency_mhz: float
    depth_mm: float
    sector_deg: float
    frames: int
    frame_time_ms: float
    rows: int
    columns: int

    @property
    def pixel_spacing(self) -> float:
        return self.depth_mm / self.rows


def sample_us_protocol(
    rng: np.random.Generator, scanner: Scanner, matrix: int, frames: int
) -> USProtocol:
    """An abdominal cine loop with a curved probe."""
    return USProtocol(
        transducer=scanner.transducer,
        frequency_mhz=float(rng.choice([2.5, 3.5, 4.0])),
        depth_mm=float(rng.choice([140.0, 160.0, 180.0])),
        sector_deg=float(rng.choice([60.0, 70.0, 75.0])),
        frames=frames,
        frame_time_ms=float(rng.choice([33.3, 40.0, 50.0])),
        rows=matrix,
        columns=int(math.ceil(matrix * 1.25 / 2) * 2),
    )
