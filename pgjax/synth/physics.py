"""How the acquisition protocol shapes the image: X-ray attenuation, CT reconstruction and noise,
MR signal equations, radiograph exposure and ultrasound speckle.

Each effect is a small named function with the physics in its docstring, so it can be read and
tested on its own; the scan_* / expose_* functions at the end of each section combine them with a
phantom (phantoms.py) and a protocol (sites.py) into stored pixel values. The models are
deliberately simple (one effective energy per beam, Gaussian MTFs, textbook relaxation times);
what matters is that every protocol field moves the image in the direction real physics does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from pgjax.synth import phantoms
from pgjax.synth.sites import (
    CTAcquisition,
    CTRecon,
    MRSeriesProtocol,
    RadiographProtocol,
    Scanner,
    USProtocol,
)

# --------------------------------------------------------------------------------------------
# X-ray attenuation


@dataclasses.dataclass(frozen=True)
class Material:
    """Attenuation relative to water: photoelectric (~ rho Z^3) and Compton (~ electron density)."""

    photo: float
    compton: float


MATERIALS: dict[str, Material] = {
    "air": Material(0.0, 0.0),
    "lung": Material(0.2, 0.2),  # parenchyma: a fifth tissue, four fifths air
    "fat": Material(0.55, 0.93),
    "soft_tissue": Material(1.1, 1.05),
    "blood": Material(1.0, 1.04),
    "thrombus": Material(1.05, 1.06),
    "trabecular_bone": Material(2.5, 1.15),
    "rib_bone": Material(6.0, 1.4),
    "cortical_bone": Material(12.4, 1.8),
}

IODINE_K_EDGE_KEV = 33.2


def water_attenuation(energy_kev: float) -> tuple[float, float]:
    """Photoelectric and Compton parts of water's linear attenuation (1/cm) at an energy.

    Photoelectric falls as E^-3; Compton barely changes over diagnostic energies. The fit is
    within a few percent of NIST tables between 30 and 100 keV.
    """
    return 4860.0 / energy_kev**3, 0.2 * (30.0 / energy_kev) ** 0.15


def iodine_mass_attenuation(energy_kev: float) -> float:
    """Iodine's mass attenuation (cm^2/g) above its K edge, where every beam here lies."""
    return 22.0 * (40.0 / max(energy_kev, IODINE_K_EDGE_KEV)) ** 2.6


def linear_attenuation(material: str, energy_kev: float, iodine_mg_ml: float = 0.0) -> float:
    """Linear attenuation (1/cm) of a material, optionally with dissolved iodine."""
    photo, compton = water_attenuation(energy_kev)
    m = MATERIALS[material]
    return (
        m.photo * photo
        + m.compton * compton
        + iodine_mg_ml * 1e-3 * iodine_mass_attenuation(energy_kev)
    )


def hounsfield(material: str, energy_kev: float, iodine_mg_ml: float = 0.0) -> float:
    """CT number: 1000 (mu - mu_water) / mu_water."""
    water = sum(water_attenuation(energy_kev))
    return 1000.0 * (linear_attenuation(material, energy_kev, iodine_mg_ml) - water) / water


def effective_energy_kev(kvp: float, beam: str) -> float:
    """Effective energy of a polychromatic beam. CT beams are hardened by heavy filtration and
    a bowtie, so their effective energy is a larger fraction of the peak than a radiograph's."""
    if beam == "ct":
        return 0.45 * kvp + 12.0
    if beam == "radiography":
        return 0.33 * kvp + 12.0
    raise ValueError(f"unknown beam {beam!r}")


# --------------------------------------------------------------------------------------------
# Sampling geometry


@dataclasses.dataclass(frozen=True)
class SliceStack:
    """A stack of parallel image planes in phantom millimetres.

    row_dir points along a row (increasing column), col_dir down a column (increasing row);
    slice k is centred at center + (k - (n - 1) / 2) * spacing * normal.
    """

    center: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    n_slices: int
    spacing: float
    rows: int
    columns: int
    pixel_spacing: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def slice_offsets(self) -> np.ndarray:
        """Each slice's signed distance from the centre along the normal (mm)."""
        return (np.arange(self.n_slices) - (self.n_slices - 1) / 2) * self.spacing

    def first_pixel(self, k: int) -> np.ndarray:
        """Centre of the first (top-left) pixel of slice k: DICOM ImagePositionPatient."""
        ps = self.pixel_spacing
        return (
            np.asarray(self.center)
            + self.slice_offsets[k] * self.normal
            - (self.columns - 1) / 2 * ps * np.asarray(self.row_dir)
            - (self.rows - 1) / 2 * ps * np.asarray(self.col_dir)
        )

    def points(self, along_normal_mm: np.ndarray):
        """(x, y, z) of every pixel of the planes at the given offsets, shape (m, rows, cols).

        Components that do not vary along an axis keep size 1 there (axial planes stay
        separable), which lets phantoms.render skip most of the grid for small shapes.
        """
        ps = self.pixel_spacing
        s = np.asarray(along_normal_mm, dtype=np.float32).reshape(-1, 1, 1)
        i = (np.arange(self.rows, dtype=np.float32) - (self.rows - 1) / 2).reshape(1, -1, 1) * ps
        j = (np.arange(self.columns, dtype=np.float32) - (self.columns - 1) / 2).reshape(1, 1, -1)
        j = j * ps
        n = self.normal
        coords = []
        for axis in range(3):
            c = np.float32(self.center[axis])
            for vec, grid in ((n, s), (self.col_dir, i), (self.row_dir, j)):
                if abs(vec[axis]) > 1e-9:
                    c = c + np.float32(vec[axis]) * grid
            c = np.asarray(c, dtype=np.float32)
            coords.append(c.reshape(np.broadcast_shapes(c.shape, (1, 1, 1))))
        return tuple(coords)


def tilted_stack(center, tilt_deg, n_slices, spacing, rows, columns, pixel_spacing) -> SliceStack:
    """Transverse planes tilted by tilt_deg about the left-right axis (0: axial)."""
    t = math.radians(tilt_deg)
    return SliceStack(
        tuple(float(c) for c in center),
        (1.0, 0.0, 0.0),
        (0.0, math.cos(t), math.sin(t)),
        n_slices,
        spacing,
        rows,
        columns,
        pixel_spacing,
    )


def sub_slice_offsets(thickness_mm: float, step_mm: float, max_samples: int = 4) -> np.ndarray:
    """Offsets (mm) of thin planes that, averaged, make one slice of the given thickness."""
    n = int(np.clip(math.ceil(thickness_mm / step_mm), 1, max_samples))
    return ((np.arange(n) + 0.5) / n - 0.5) * thickness_mm


def render_stack(
    layers,
    stack: SliceStack,
    values: Mapping[str, float],
    thickness_mm: float,
    step_mm: float,
    background: float = 0.0,
) -> np.ndarray:
    """Render every slice of a stack, averaging thin planes across the slice thickness
    (through-plane partial volume). Returns float32 (n_slices, rows, cols)."""
    offsets = sub_slice_offsets(thickness_mm, step_mm)
    out = np.empty((stack.n_slices, stack.rows, stack.columns), dtype=np.float32)
    # About 4 M samples per batch bounds memory at large matrices.
    batch = max(1, (1 << 22) // (stack.rows * stack.columns * len(offsets)))
    for start in range(0, stack.n_slices, batch):
        centers = stack.slice_offsets[start : start + batch]
        planes = (centers[:, None] + offsets[None, :]).ravel()
        x, y, z = stack.points(planes)
        img = phantoms.render(layers, x, y, z, values, stack.pixel_spacing, background)
        out[start : start + len(centers)] = img.reshape(
            len(centers), len(offsets), stack.rows, stack.columns
        ).mean(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Frequency-domain filters


def radial_frequency(rows: int, cols: int) -> np.ndarray:
    """|f| in cycles per pixel on an rfft2 grid of an image of this size."""
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    return np.sqrt(fy * fy + fx * fx)


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of the last two axes, with reflected borders (no wrap-around)."""
    if sigma_px <= 0:
        return image
    pad = int(min(math.ceil(3 * sigma_px), min(image.shape[-2:]) - 1))
    widths = [(0, 0)] * (image.ndim - 2) + [(pad, pad), (pad, pad)]
    padded = np.pad(image, widths, mode="reflect")
    f = radial_frequency(*padded.shape[-2:])
    transfer = np.exp(-2.0 * (math.pi * sigma_px * f) ** 2)
    out = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape[-2:])
    return out[..., pad : pad + image.shape[-2], pad : pad + image.shape[-1]].astype(image.dtype)


def smooth_random_field(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise correlated over about sigma_px pixels."""
    field = gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


# --------------------------------------------------------------------------------------------
# CT

# Reconstruction kernels as (cutoff in cycles/pixel, edge-enhancement boost). Vendors' names
# for each family live in sites.Scanner.kernels.
KERNEL_SHAPES = {"smooth": (0.16, 0.0), "standard": (0.26, 0.0), "sharp": (0.42, 1.2)}


def kernel_mtf(freq: np.ndarray, kernel_class: str) -> np.ndarray:
    """Modulation transfer of a reconstruction kernel: a Gaussian roll-off, lifted at high
    frequencies for sharp kernels (edge enhancement, overshoot at boundaries). MTF(0) = 1, so
    mean HU are preserved."""
    cutoff, boost = KERNEL_SHAPES[kernel_class]
    return np.exp(-0.5 * (freq / cutoff) ** 2) * (1.0 + boost * (freq / 0.5) ** 2)


def apply_kernel(images: np.ndarray, kernel_class: str) -> np.ndarray:
    """Filter (…, rows, cols) images with a kernel's MTF."""
    f = radial_frequency(*images.shape[-2:])
    out = np.fft.irfft2(np.fft.rfft2(images) * kernel_mtf(f, kernel_class), s=images.shape[-2:])
    return out.astype(np.float32)


def ct_noise_sigma(exposure_mas: float, kvp: float, slice_thickness_mm: float) -> float:
    """Quantum noise (HU, standard kernel) of a CT image.

    Noise ~ 1/sqrt(photons): photons grow with mAs, roughly with kVp^2.5 (tube output and
    penetration), and with slice thickness (more detector rows averaged). 11 HU at 200 mAs,
    120 kVp and 5 mm is typical of a body scan.
    """
    return (
        11.0
        * math.sqrt(200.0 / exposure_mas)
        * (120.0 / kvp) ** 1.25
        * math.sqrt(5.0 / slice_thickness_mm)
    )


def ct_noise(
    rng: np.random.Generator, shape, sigma: float, kernel_class: str, grain: float = 1.0
) -> np.ndarray:
    """CT noise with the texture of filtered back-projection.

    The noise power spectrum of FBP is the ramp filter times the kernel's MTF squared,
    NPS(f) ~ f |MTF(f)|^2: smooth kernels give blotchy low-frequency noise, sharp kernels fine
    grain and more of it. sigma is the standard deviation for the standard kernel; other kernels
    scale it by their noise power. grain < 1 shifts the texture coarser (iterative
    reconstruction, a vendor trait).
    """
    f = radial_frequency(*shape[-2:])
    shaped = np.sqrt(f) * kernel_mtf(f / grain, kernel_class)
    reference = np.sqrt(f) * kernel_mtf(f, "standard")
    gain = sigma / math.sqrt(float(np.mean(reference**2)))
    white = rng.standard_normal(shape).astype(np.float32)
    return (np.fft.irfft2(np.fft.rfft2(white) * shaped, s=shape[-2:]) * gain).astype(np.float32)


# Iodine (mg/mL) reaching each compartment, as a fraction of the pulmonary arterial peak: a
# CTPA is timed for the pulmonary arteries; the left heart and aorta are only partly filled.
CTPA_IODINE_FRACTION = {
    "pulmonary_artery": 1.0,
    "right_heart": 0.9,
    "lung_vessel": 0.75,
    "pulmonary_vein": 0.45,
    "left_heart": 0.45,
    "aorta": 0.4,
    "unopacified_blood": 0.55,
    "myocardium": 0.04,
}


def ct_tissue_hu(kvp: float, peak_iodine_mg_ml: float) -> dict[str, float]:
    """CT number of every chest tissue at a kVp, with contrast in the vessels.

    Iodine enhancement rises steeply as kVp falls (the beam approaches iodine's K edge), which
    is why low-kVp CTPA protocols exist.
    """
    energy = effective_energy_kev(kvp, "ct")
    return {
        tissue: hounsfield(
            material, energy, peak_iodine_mg_ml * CTPA_IODINE_FRACTION.get(tissue, 0.0)
        )
        for tissue, material in phantoms.TISSUE_MATERIAL.items()
    }


def ct_stack(recon: CTRecon) -> SliceStack:
    return tilted_stack(
        (0.0, 0.0, recon.z_center),
        0.0,
        recon.n_slices,
        recon.slice_spacing,
        recon.matrix,
        recon.matrix,
        recon.pixel_spacing,
    )


def scan_ct(
    layers: Sequence,
    peak_iodine_mg_ml: float,
    acquisition: CTAcquisition,
    recon: CTRecon,
    scanner: Scanner,
    rng: np.random.Generator,
) -> np.ndarray:
    """One reconstructed CT series, in Hounsfield units, float32 (slices, rows, cols).

    Thin planes averaged over the slice thickness, the kernel's blur or edge enhancement,
    noise from mAs / kVp / thickness / kernel, the scanner's calibration offset, and the
    reconstruction circle (outside it the scanner's fill value).
    """
    tissue_hu = ct_tissue_hu(acquisition.kvp, peak_iodine_mg_ml)
    hu = render_stack(
        layers, ct_stack(recon), tissue_hu, recon.slice_thickness, 1.25, tissue_hu["air"]
    )
    hu = apply_kernel(hu + 1000.0, recon.kernel_class) - 1000.0  # air outside stays -1000
    sigma = ct_noise_sigma(acquisition.exposure_mas, acquisition.kvp, recon.slice_thickness)
    hu += ct_noise(rng, hu.shape, sigma, recon.kernel_class, scanner.noise_grain)
    hu += scanner.hu_offset
    n = recon.matrix
    r = np.hypot(*np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2))
    hu[:, r > n / 2] = scanner.outside_fov_hu
    return hu


def hu_to_stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored int16 values such that HU = stored * slope + intercept."""
    stored = np.rint((hu - intercept) / slope)
    return np.clip(stored, -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------
# MR


@dataclasses.dataclass(frozen=True)
class Relaxation:
    """Proton density (relative), T1 at 1.5 T and T2 (ms), T1's field exponent, and the
    gadolinium concentration (mM) the tissue takes up after injection."""

    pd: float
    t1_ms: float
    t2_ms: float
    t1_exponent: float = 0.35
    gd_mm: float = 0.0


# Textbook values at 1.5 T. CSF is nearly free water, whose T1 hardly depends on the field.
RELAXATION: dict[str, Relaxation] = {
    "fat": Relaxation(0.9, 260.0, 80.0, 0.3),
    "bone": Relaxation(0.05, 300.0, 2.0, 0.3),
    "csf": Relaxation(1.0, 4000.0, 2000.0, 0.03),
    "gm": Relaxation(0.82, 1100.0, 95.0),
    "wm": Relaxation(0.70, 650.0, 80.0),
    "edema": Relaxation(0.88, 1150.0, 180.0, 0.3),
    "tumor": Relaxation(0.85, 1300.0, 130.0, 0.3, gd_mm=0.03),
    "enhancing_tumor": Relaxation(0.85, 1300.0, 120.0, 0.3, gd_mm=0.35),
    "necrosis": Relaxation(0.95, 2600.0, 600.0, 0.1),
}


def t1_at_field(t1_15t_ms: float, field_t: float, exponent: float) -> float:
    """T1 lengthens with field strength, roughly as B0^(1/3) for tissue."""
    return t1_15t_ms * (field_t / 1.5) ** exponent


def t2_at_field(t2_15t_ms: float, field_t: float) -> float:
    """T2 shortens slightly at higher field (susceptibility, diffusion)."""
    return t2_15t_ms * (1.0 - 0.1 * (field_t - 1.5) / 1.5)


def gadolinium_t1(t1_ms: float, concentration_mm: float, r1_per_mm_s: float = 4.0) -> float:
    """T1 after contrast: relaxation rates add, 1/T1 = 1/T1_0 + r1 [Gd]."""
    return 1.0 / (1.0 / t1_ms + r1_per_mm_s * concentration_mm / 1000.0)


def spin_echo_signal(pd, t1, t2, tr, te):
    """Spin echo: S = PD (1 - exp(-TR/T1)) exp(-TE/T2). Short TR/TE: T1 weighting; long: T2."""
    return pd * (1.0 - math.exp(-tr / t1)) * math.exp(-te / t2)


def inversion_recovery_signal(pd, t1, t2, tr, te, ti):
    """Inversion recovery, magnitude: S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2).
    A TI near T1 ln 2 nulls the tissue with that T1 (FLAIR nulls CSF)."""
    return pd * abs(1.0 - 2.0 * math.exp(-ti / t1) + math.exp(-tr / t1)) * math.exp(-te / t2)


def spoiled_gradient_echo_signal(pd, t1, t2star, tr, te, flip_deg):
    """Spoiled gradient echo (steady state): PD sin a (1 - E1) / (1 - cos a E1) exp(-TE/T2*)."""
    a = math.radians(flip_deg)
    e1 = math.exp(-tr / t1)
    return pd * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * math.exp(-te / t2star)


def mr_tissue_signal(tissue: Relaxation, protocol: MRSeriesProtocol) -> float:
    """The noiseless signal of one tissue under one series' sequence and field strength."""
    b0, seq = protocol.field_strength, protocol.sequence
    t1 = t1_at_field(tissue.t1_ms, b0, tissue.t1_exponent)
    if seq.contrast and tissue.gd_mm > 0:
        t1 = gadolinium_t1(t1, tissue.gd_mm)
    t2 = t2_at_field(tissue.t2_ms, b0)
    if seq.weighting == "se":
        return spin_echo_signal(tissue.pd, t1, t2, protocol.tr, protocol.te)
    if seq.weighting == "ir":
        return inversion_recovery_signal(tissue.pd, t1, t2, protocol.tr, protocol.te, protocol.ti)
    if seq.weighting == "gre":
        # T2* taken as 0.6 T2: no susceptibility model here.
        return spoiled_gradient_echo_signal(
            tissue.pd, t1, 0.6 * t2, protocol.tr, protocol.te, protocol.flip
        )
    raise ValueError(f"unknown MR weighting {seq.weighting!r}")


def mr_snr(field_t: float, voxel_mm3: float, averages: int, acquisition: str) -> float:
    """SNR of brain tissue: grows about linearly with B0, with voxel volume, with sqrt(averages),
    and 3D acquisitions gain from encoding the whole slab at once."""
    gain_3d = 1.8 if acquisition == "3D" else 1.0
    return 28.0 * (field_t / 1.5) * (voxel_mm3 / 16.0) * math.sqrt(averages) * gain_3d


def coil_bias(x, y, z, field_t: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative receive/transmit bias: a random gradient across the head plus,
    at 3 T, central brightening (B1 inhomogeneity grows with frequency)."""
    g = rng.normal(size=3) * (0.12 if field_t < 2 else 0.18)
    centre = 0.0 if field_t < 2 else float(rng.uniform(0.1, 0.25))
    log_bias = (g[0] * x + g[1] * y + g[2] * z) / 100.0 + centre * np.exp(
        -(x * x + y * y) / (2 * 55.0**2)
    )
    return np.exp(log_bias).astype(np.float32)


def rician_magnitude(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise: Rician, with a noise floor in air."""
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def mr_stack(protocol: MRSeriesProtocol) -> SliceStack:
    return tilted_stack(
        (0.0, 0.0, protocol.z_center),
        protocol.tilt_deg,
        protocol.n_slices,
        protocol.slice_spacing,
        protocol.rows,
        protocol.columns,
        protocol.pixel_spacing,
    )


def scan_mr(
    layers: Sequence, protocol: MRSeriesProtocol, scanner: Scanner, rng: np.random.Generator
) -> np.ndarray:
    """One MR series in the scanner's arbitrary units, float32 (slices, rows, cols)."""
    signals = {name: mr_tissue_signal(t, protocol) for name, t in RELAXATION.items()}
    stack = mr_stack(protocol)
    image = render_stack(layers, stack, signals, protocol.slice_thickness, step_mm=2.5)
    x, y, z = stack.points(stack.slice_offsets)
    image *= coil_bias(x, y, z, protocol.field_strength, rng)
    voxel = protocol.pixel_spacing**2 * protocol.slice_thickness
    snr = mr_snr(protocol.field_strength, voxel, protocol.averages, protocol.sequence.acquisition)
    sigma = max(signals["wm"], signals["gm"]) / snr
    image = rician_magnitude(image, sigma, rng)
    receiver_gain = float(rng.uniform(0.7, 1.3))  # auto-prescan: every series scaled anew
    return image * np.float32(scanner.gain * receiver_gain)


# --------------------------------------------------------------------------------------------
# Radiography


def magnification(sid_mm: float, object_to_detector_mm: float) -> float:
    """Geometric magnification of a point source: SID / (SID - OID)."""
    return sid_mm / (sid_mm - object_to_detector_mm)


def chest_magnifications(chest: phantoms.ChestAnatomy, view: str, sid_mm: float) -> dict:
    """Magnification of the chest wall, heart and spine for a PA or AP projection.

    PA puts the anterior chest (and the heart) against the detector; AP puts the back there and
    uses a short SID, so the heart is enlarged relative to the thorax.
    """
    b = chest.body_radii[1]
    depth = {"thorax": 5.0, "heart": chest.heart_center[1], "spine": b - 40.0}
    if view == "PA":
        oid = {k: y + b for k, y in depth.items()}
    elif view == "AP":
        oid = {k: b - y for k, y in depth.items()}
    else:
        raise ValueError(f"unknown view {view!r}")
    return {k: magnification(sid_mm, d) for k, d in oid.items()}


def photons_per_pixel(kvp: float, exposure_mas: float, sid_mm: float, pixel_mm: float) -> float:
    """Unattenuated photons reaching one detector pixel: tube output grows with mAs and about
    kVp^2, and falls with the inverse square of the source distance."""
    return (
        2.0e4
        * (exposure_mas / 2.0)
        * (kvp / 120.0) ** 2
        * (1800.0 / sid_mm) ** 2
        * (pixel_mm / 1.6) ** 2
    )


def quantum_noise(counts: np.ndarray, rng: np.random.Generator, grain: float = 1.0) -> np.ndarray:
    """Detected counts with Poisson noise (Gaussian approximation, variance = mean), so the
    relative noise falls as 1/sqrt(exposure). grain < 1 correlates neighbouring pixels (light
    spread in a CR phosphor plate) without changing the variance."""
    noise = rng.standard_normal(counts.shape).astype(np.float32)
    if grain < 1.0:
        noise = smooth_random_field(rng, counts.shape, 1.5 * (1.0 / grain - 1.0))
    return np.maximum(counts + np.sqrt(counts) * noise, 1.0)


def scatter(primary: np.ndarray, grid: bool, pixel_mm: float) -> np.ndarray:
    """Scattered radiation: a broad blur of the primary. An anti-scatter grid removes most of
    it; bedside AP films are taken without one, which lowers their contrast."""
    fraction = 0.15 if grid else 0.45
    return fraction * gaussian_blur(primary, 40.0 / pixel_mm)


def expose_radiograph(
    chest: phantoms.ChestAnatomy,
    protocol: RadiographProtocol,
    scanner: Scanner,
    rng: np.random.Generator,
) -> np.ndarray:
    """A processed frontal chest radiograph as stored values (uint16, BitsStored of the scanner;
    high values = high attenuation, MONOCHROME2 sense).

    Beer-Lambert attenuation at the beam's effective energy, scatter, detector blur, Poisson
    quantum noise, log conversion, unsharp-mask processing, and a vendor gain around the
    image's median (automatic exposure normalisation keeps brightness, not contrast).
    """
    n, ps = protocol.matrix, protocol.pixel_spacing
    mag = chest_magnifications(chest, protocol.view, protocol.sid_mm)
    s = chest.scale
    # Detector coordinates (mm); the film is centred a little below the carina, with jitter.
    u = ((np.arange(n) - (n - 1) / 2) * ps).reshape(1, -1) + rng.normal(0, 6)
    centre_z = (-25.0 * s + rng.normal(0, 8)) * mag["thorax"]
    v = (((n - 1) / 2 - np.arange(n)) * ps).reshape(-1, 1) + centre_z
    # Vascular lung markings: a smooth random field over a few millimetres.
    texture = 0.15 / (1.0 + np.exp(-2.0 * smooth_random_field(rng, (n, n), 4.0 / ps)))
    paths = phantoms.chest_projection_paths(chest, u, v, mag, lung_texture=texture)
    energy = effective_energy_kev(protocol.kvp, "radiography")
    line_integral = sum(linear_attenuation(m, energy) / 10.0 * t for m, t in paths.items())
    primary = np.exp(-line_integral).astype(np.float32)
    signal = gaussian_blur(primary + scatter(primary, protocol.grid, ps), 0.6)
    n0 = photons_per_pixel(protocol.kvp, protocol.exposure_mas, protocol.sid_mm, ps)
    counts = quantum_noise(n0 * signal, rng, scanner.noise_grain)
    log_image = -np.log(counts / n0)
    # Vendor image processing: unsharp masking over ~13 mm lifts local contrast.
    processed = log_image + scanner.unsharp * (log_image - gaussian_blur(log_image, 13.0 / ps))
    body = processed[processed > 0.5]
    reference = float(np.median(body)) if body.size else float(np.median(processed))
    top = 2**scanner.bits_stored - 1
    stored = np.rint(top * np.clip(0.5 + scanner.gain * (processed - reference), 0.0, 1.0))
    return stored.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Ultrasound

US_TINT = {"SIEMENS": (1.0, 0.97, 0.9), "GE MEDICAL SYSTEMS": (0.93, 0.97, 1.0)}


def speckle(rng: np.random.Generator, shape, axial_px: float, lateral_px: float) -> np.ndarray:
    """Complex speckle: circular Gaussian scattering filtered by the pulse's point spread
    function (short axially, wider laterally). Its magnitude is Rayleigh distributed."""
    field = rng.standard_normal((2, *shape)).astype(np.float32)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.rfftfreq(shape[-1])[None, :]
    psf = np.exp(-2 * math.pi**2 * ((fy * axial_px) ** 2 + (fx * lateral_px) ** 2))
    real, imag = (np.fft.irfft2(np.fft.rfft2(f) * psf, s=shape[-2:]) for f in field)
    scale = math.sqrt(float(np.mean(real**2 + imag**2)))
    return (real + 1j * imag) / scale


def tissue_attenuation_db(depth_mm: np.ndarray, frequency_mhz: float) -> np.ndarray:
    """Round-trip attenuation in soft tissue, about 0.5 dB/cm/MHz each way."""
    return 2 * 0.5 * frequency_mhz * depth_mm / 10.0


def scan_us(
    scene: list[phantoms.Ellipse2D],
    protocol: USProtocol,
    scanner: Scanner,
    rng: np.random.Generator,
) -> np.ndarray:
    """A B-mode cine loop from a curved probe: uint8 RGB (frames, rows, cols, 3).

    Echogenicity times Rayleigh speckle (partly decorrelating between frames as the patient
    breathes), depth attenuation with imperfect time-gain compensation, the vendor's overall
    gain, log compression to a 50 dB dynamic range, and the vendor's colour tint.
    """
    rows, cols, ps = protocol.rows, protocol.columns, protocol.pixel_spacing
    apex = 40.0  # probe radius of curvature (mm): the sector's apex sits this far above the skin
    x = ((np.arange(cols) - (cols - 1) / 2) * ps).reshape(1, -1)
    y = (np.arange(rows) * ps).reshape(-1, 1)
    r = np.hypot(x, y + apex)
    theta = np.arctan2(x, y + apex)
    depth = r - apex
    inside = (
        (depth >= 0)
        & (depth <= protocol.depth_mm)
        & (np.abs(theta) <= math.radians(protocol.sector_deg / 2))
    )
    residual_db = 0.15 * tissue_attenuation_db(depth, protocol.frequency_mhz)
    axial = 0.35 * 3.5 / protocol.frequency_mhz / ps + 0.3
    field = speckle(rng, (rows, cols), axial, 2.2 * axial)
    frames = []
    for k in range(protocol.frames):
        shift = 4.0 * math.sin(2 * math.pi * k * protocol.frame_time_ms / 1000.0 / 4.0)
        echo = np.full((rows, cols), 0.35, dtype=np.float32)
        for ellipse in scene:
            occ = ellipse.occupancy(x, y - shift, edge_mm=ps)
            echo += occ * (np.float32(ellipse.echo) - echo)
        fresh = speckle(rng, (rows, cols), axial, 2.2 * axial)
        field = 0.85 * field + math.sqrt(1 - 0.85**2) * fresh
        envelope = echo * np.abs(field) * 10 ** (-residual_db / 20.0)
        frames.append(np.where(inside, envelope, 0.0))
    db = 20 * np.log10(np.stack(frames) * scanner.gain + 1e-6)
    # 0 dB is a unit echo with unit speckle; display +5 dB (white) down to -45 dB (black).
    gray = np.clip((db + 45.0) / 50.0, 0.0, 1.0) * inside
    tint = np.asarray(US_TINT.get(scanner.manufacturer, (1.0, 1.0, 1.0)), dtype=np.float32)
    rgb = np.rint(255.0 * gray[..., None] * tint).astype(np.uint8)
    # Depth ticks every centimetre in the right margin, as scanners burn them in.
    ticks = np.arange(0, rows, max(1, int(round(10.0 / ps))))
    rgb[:, ticks, cols - 3 :, :] = (40, 220, 90)
    return rgb
