"""Synthetic anatomy and findings: chest and brain phantoms as implicit shapes in millimetres.

Coordinates follow DICOM's patient system (LPS): +x towards the patient's left, +y posterior,
+z superior. The origin is an anatomical landmark (the carina for the chest, the centre of the
brain for the head), not the scanner's isocentre; callers add a table offset when writing headers.

A phantom is a list of layers painted in order: a later layer replaces earlier ones where it
overlaps them, and each layer has a soft edge one sample wide, so partial volumes come out right
without a voxel model. Shapes are evaluated at arbitrary points, so oblique slices cost nothing
extra. Sampling anatomy and findings is done here; turning them into pixels under an acquisition
protocol is physics.py's job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

Vec3 = tuple[float, float, float]

# Which physical material (physics.MATERIALS) each tissue is made of, for X-ray modalities.
# Compartments of blood are separate tissues because contrast agent reaches them differently.
TISSUE_MATERIAL: dict[str, str] = {
    "air": "air",
    "fat": "fat",
    "muscle": "soft_tissue",
    "lung": "lung",
    "myocardium": "soft_tissue",
    "right_heart": "blood",
    "left_heart": "blood",
    "aorta": "blood",
    "pulmonary_artery": "blood",
    "pulmonary_vein": "blood",
    "lung_vessel": "blood",
    "unopacified_blood": "blood",
    "thrombus": "thrombus",
    "vertebra": "trabecular_bone",
    "cortical_bone": "cortical_bone",
    "rib": "rib_bone",
    "spinal_canal": "soft_tissue",
}


# --------------------------------------------------------------------------------------------
# Shapes


def _box(center, half_widths):
    return (
        [c - h for c, h in zip(center, half_widths, strict=True)],
        [c + h for c, h in zip(center, half_widths, strict=True)],
    )


def _soft_edge(signed_distance_mm, edge_mm: float):
    """Occupancy from a signed distance (negative inside): a linear ramp one edge wide."""
    return np.clip(0.5 - signed_distance_mm / edge_mm, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid; a very long z radius makes an elliptic cylinder."""

    tissue: str
    center: Vec3
    radii: Vec3

    def occupancy(self, x, y, z, edge_mm: float):
        (cx, cy, cz), (rx, ry, rz) = self.center, self.radii
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2)
        # (r - 1) times the smallest radius approximates the distance to the surface; exact
        # enough for a one-sample edge.
        return _soft_edge((r - 1.0) * min(rx, ry, rz), edge_mm)

    def bounds(self, edge_mm: float):
        grow = 1.0 + edge_mm / min(self.radii)
        return _box(self.center, [r * grow for r in self.radii])


@dataclasses.dataclass(frozen=True)
class Capsule:
    """A tube of constant radius around the segment p0-p1 (vessels, clots)."""

    tissue: str
    p0: Vec3
    p1: Vec3
    radius: float

    def point(self, t: float) -> Vec3:
        """The point at fraction t of the way from p0 to p1."""
        return tuple(a + t * (b - a) for a, b in zip(self.p0, self.p1, strict=True))

    @property
    def length(self) -> float:
        return math.dist(self.p0, self.p1)

    def occupancy(self, x, y, z, edge_mm: float):
        p0 = np.asarray(self.p0)
        d = np.asarray(self.p1) - p0
        dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / float(d @ d), 0.0, 1.0)
        dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
        return _soft_edge(dist - self.radius, edge_mm)

    def bounds(self, edge_mm: float):
        reach = self.radius + edge_mm
        lo = [min(a, b) - reach for a, b in zip(self.p0, self.p1, strict=True)]
        hi = [max(a, b) + reach for a, b in zip(self.p0, self.p1, strict=True)]
        return lo, hi


@dataclasses.dataclass(frozen=True)
class FoldedEllipsoid:
    """An ellipsoid whose surface is pushed in and out by a sum of plane waves on the sphere.

    With short waves this is a cortex (gyri and sulci); with long ones an irregular tumour.
    waves: (kx, ky, kz, phase) per wave, evaluated on the unit direction from the centre.
    depth: the fold amplitude as a fraction of the radius.
    """

    tissue: str
    center: Vec3
    radii: Vec3
    waves: tuple[tuple[float, float, float, float], ...]
    depth: float

    def occupancy(self, x, y, z, edge_mm: float):
        (cx, cy, cz), (rx, ry, rz) = self.center, self.radii
        ux, uy, uz = (x - cx) / rx, (y - cy) / ry, (z - cz) / rz
        r = np.sqrt(ux * ux + uy * uy + uz * uz)
        inv = 1.0 / np.maximum(r, 1e-6)
        fold = sum(np.sin((kx * ux + ky * uy + kz * uz) * inv + p) for kx, ky, kz, p in self.waves)
        boundary = 1.0 + self.depth * fold / math.sqrt(max(len(self.waves), 1))
        return _soft_edge((r - boundary) * min(rx, ry, rz), edge_mm)

    def bounds(self, edge_mm: float):
        grow = 1.0 + self.depth * math.sqrt(len(self.waves)) + edge_mm / min(self.radii)
        return _box(self.center, [r * grow for r in self.radii])


@dataclasses.dataclass(frozen=True)
class RibCage:
    """Ribs: an elliptic shell around the chest wall, cut into bands that slope down anteriorly."""

    tissue: str
    radii: tuple[float, float]  # the shell's mid-line, in x and y
    thickness_mm: float
    rib_height_mm: float
    period_mm: float
    phase_mm: float
    z_range: tuple[float, float]

    def occupancy(self, x, y, z, edge_mm: float):
        a, b = self.radii
        rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        radial = _soft_edge(np.abs(rho - 1.0) * min(a, b) - self.thickness_mm / 2, edge_mm)
        # Anterior rib ends sit about 30 mm lower than their posterior heads.
        shifted = z - self.phase_mm + 30.0 * np.clip(-y / b, 0.0, 1.0)
        wrapped = np.abs((shifted + self.period_mm / 2) % self.period_mm - self.period_mm / 2)
        band = _soft_edge(wrapped - self.rib_height_mm / 2, edge_mm)
        lo, hi = self.z_range
        inside = _soft_edge(np.maximum(lo - z, z - hi), edge_mm)
        return radial * band * inside

    def bounds(self, edge_mm: float):
        a, b = self.radii
        grow = 1.0 + (self.thickness_mm / 2 + edge_mm) / min(a, b)
        return [-a * grow, -b * grow, self.z_range[0] - edge_mm], [
            a * grow,
            b * grow,
            self.z_range[1] + edge_mm,
        ]


@dataclasses.dataclass(frozen=True)
class Within:
    """A shape clipped to the inside of another (a tumour cannot leave the brain)."""

    shape: Ellipsoid | Capsule | FoldedEllipsoid
    container: Ellipsoid

    @property
    def tissue(self) -> str:
        return self.shape.tissue

    def occupancy(self, x, y, z, edge_mm: float):
        inner = self.shape.occupancy(x, y, z, edge_mm)
        return inner * self.container.occupancy(x, y, z, edge_mm)

    def bounds(self, edge_mm: float):
        return self.shape.bounds(edge_mm)


Shape = Ellipsoid | Capsule | FoldedEllipsoid | RibCage | Within


def _index_box(coords, bounds, shape):
    """The index box of the output grid that can hold points inside a shape's bounding box,
    or None. Exact for separable grids, a safe superset otherwise."""
    box = [[0, n] for n in shape]
    for a, lo, hi in zip(coords, *bounds, strict=True):
        inside = (a >= lo) & (a <= hi)
        if not inside.any():
            return None
        for axis, n in enumerate(a.shape):
            if n == 1:
                continue
            others = tuple(d for d in range(a.ndim) if d != axis)
            hits = np.flatnonzero(inside.any(axis=others))
            box[axis] = [max(box[axis][0], int(hits[0])), min(box[axis][1], int(hits[-1]) + 1)]
    if any(lo >= hi for lo, hi in box):
        return None
    return tuple(slice(lo, hi) for lo, hi in box)


def render(
    layers: Sequence[Shape],
    x,
    y,
    z,
    values: Mapping[str, float],
    edge_mm: float,
    background: float = 0.0,
) -> np.ndarray:
    """Paint the layers in order at points (x, y, z) (broadcastable arrays, mm).

    values maps each layer's tissue to the quantity being imaged (HU, MR signal, 1 for a mask);
    the result is float32 with the broadcast shape of x, y and z. Each layer is evaluated only
    inside its bounding box, so small vessels cost little.
    """
    coords = [np.asarray(a, dtype=np.float32) for a in (x, y, z)]
    shape = np.broadcast_shapes(*(a.shape for a in coords))
    coords = [a.reshape((1,) * (len(shape) - a.ndim) + a.shape) for a in coords]
    out = np.full(shape, background, dtype=np.float32)
    for layer in layers:
        box = _index_box(coords, layer.bounds(edge_mm), shape)
        if box is None:
            continue
        xs, ys, zs = (
            a[tuple(sl if n > 1 else slice(None) for sl, n in zip(box, a.shape, strict=True))]
            for a in coords
        )
        occ = layer.occupancy(xs, ys, zs, edge_mm)
        region = out[box]
        region += occ * (np.float32(values[layer.tissue]) - region)
    return out


def tissue_fraction(layers: Sequence[Shape], x, y, z, tissue: str, edge_mm: float) -> np.ndarray:
    """The fraction of each sample occupied by one tissue after painting (a soft mask)."""
    values = {layer.tissue: float(layer.tissue == tissue) for layer in layers}
    return render(layers, x, y, z, values, edge_mm)


def _random_waves(rng: np.random.Generator, n: int, wavenumber: float):
    waves = []
    for _ in range(n):
        k = rng.normal(size=3)
        k *= wavenumber / np.linalg.norm(k)
        waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi))))
    return tuple(waves)


# --------------------------------------------------------------------------------------------
# Chest


@dataclasses.dataclass(frozen=True)
class ChestAnatomy:
    """One patient's chest. ctr is the ground-truth cardiothoracic ratio (PA-equivalent)."""

    scale: float
    habitus: float  # soft-tissue build relative to the skeleton, ~0.9 (slim) to 1.45 (obese)
    body_radii: tuple[float, float]
    fat_mm: float
    right_lung: tuple[Vec3, Vec3]  # centre, radii
    left_lung: tuple[Vec3, Vec3]
    heart_center: Vec3
    heart_radii: Vec3
    domes: tuple[tuple[Vec3, Vec3], ...]  # liver and spleen under the diaphragm
    ctr: float
    female: bool
    rib_phase_mm: float
    lung_vessels: tuple[Capsule, ...]

    @property
    def thoracic_width(self) -> float:
        """Inner thoracic width at its widest: outer edge of one lung to the other's (mm)."""
        (rc, rr), (lc, lr) = self.right_lung, self.left_lung
        return (lc[0] + lr[0]) - (rc[0] - rr[0])


def sample_chest(rng: np.random.Generator, ctr: float, female: bool) -> ChestAnatomy:
    """A chest of random size and habitus whose heart width gives the requested cardiothoracic
    ratio (of the thorax, which habitus does not change)."""
    s = float(rng.uniform(0.88, 1.12)) * (0.94 if female else 1.0)
    # Habitus: soft tissue around the same thorax, from slim to obese. A wider, deeper body
    # attenuates and scatters more and sits the heart further from an AP detector.
    habitus = float(np.clip(rng.lognormal(0.0, 0.12), 0.9, 1.45))
    body = (
        150.0 * s * habitus * rng.uniform(0.95, 1.05),
        105.0 * s * habitus * rng.uniform(0.92, 1.08),
    )
    right = ((-68.0 * s, 5.0, -30.0 * s), (57.0 * s, 72.0 * s, 130.0 * s))
    left = ((70.0 * s, 5.0, -40.0 * s), (53.0 * s, 70.0 * s, 127.0 * s))
    # Diaphragm domes: the right one (over the liver) sits higher.
    domes = (
        ((-70.0 * s, 10.0, -215.0 * s), (110.0 * s, 110.0 * s, 90.0 * s)),
        ((75.0 * s, 10.0, -230.0 * s), (100.0 * s, 100.0 * s, 90.0 * s)),
    )
    thoracic = (left[0][0] + left[1][0]) - (right[0][0] - right[1][0])
    heart_rx = ctr * thoracic / 2.0
    heart_center = (18.0 * s + rng.normal(0, 3), -38.0 * s, -70.0 * s)
    heart_radii = (heart_rx, 0.72 * heart_rx, 58.0 * s)
    vessels = []
    for lung_center, lung_radii in (right, left):
        for _ in range(int(rng.integers(9, 14))):
            # Peripheral vessels run roughly cranio-caudally from the hilum outwards.
            u = rng.uniform(-0.65, 0.65, size=3)
            p0 = np.asarray(lung_center) + u * np.asarray(lung_radii)
            direction = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
            p1 = p0 + direction / np.linalg.norm(direction) * rng.uniform(25, 70)
            radius = float(rng.uniform(1.2, 2.6))
            vessels.append(Capsule("lung_vessel", tuple(p0.tolist()), tuple(p1.tolist()), radius))
    return ChestAnatomy(
        scale=s,
        body_radii=body,
        fat_mm=float(rng.uniform(8, 25) * s * habitus),
        habitus=habitus,
        right_lung=right,
        left_lung=left,
        heart_center=heart_center,
        heart_radii=heart_radii,
        domes=domes,
        ctr=float(ctr),
        female=female,
        rib_phase_mm=float(rng.uniform(0, 25)),
        lung_vessels=tuple(vessels),
    )


def pulmonary_arteries(chest: ChestAnatomy) -> tuple[Capsule, ...]:
    """Trunk, main and lobar pulmonary arteries: where an embolus can lodge."""
    s = chest.scale
    trunk_start = (chest.heart_center[0] - 5 * s, chest.heart_center[1] - 5 * s, -30.0 * s)
    bifurcation = (10.0 * s, -12.0 * s, 2.0 * s)
    right_end = (-55.0 * s, 2.0 * s, -2.0 * s)
    left_end = (55.0 * s, 8.0 * s, 8.0 * s)
    arteries = [
        Capsule("pulmonary_artery", trunk_start, bifurcation, 13.0 * s),
        Capsule("pulmonary_artery", bifurcation, right_end, 10.5 * s),
        Capsule("pulmonary_artery", bifurcation, left_end, 10.0 * s),
    ]
    for end, side in ((right_end, -1.0), (left_end, 1.0)):
        for dy, dz in ((-25.0, 45.0), (10.0, -55.0), (30.0, -25.0)):
            tip = (end[0] + side * 30.0 * s, end[1] + dy * s, end[2] + dz * s)
            arteries.append(Capsule("pulmonary_artery", end, tip, 5.5 * s))
    return tuple(arteries)


@dataclasses.dataclass(frozen=True)
class PEClot:
    """A pulmonary embolus: a thrombus tube inside one artery. diameter_mm is the score."""

    clot: Capsule
    artery_index: int

    @property
    def diameter_mm(self) -> float:
        return 2.0 * self.clot.radius

    @property
    def center(self) -> Vec3:
        return self.clot.point(0.5)


def _segment_inside(artery: Capsule, t_lo: float, t_hi: float, radius: float, offset: float):
    """A sub-segment of an artery from t_lo to t_hi, shifted sideways by offset (mm)."""
    p0, p1 = np.asarray(artery.point(t_lo)), np.asarray(artery.point(t_hi))
    axis = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-6)
    side = np.cross(axis, [0.0, 0.0, 1.0])
    if np.linalg.norm(side) < 1e-3:
        side = np.cross(axis, [1.0, 0.0, 0.0])
    side /= np.linalg.norm(side)
    return tuple((p0 + offset * side).tolist()), tuple((p1 + offset * side).tolist()), radius


def _positions_in_slab(artery: Capsule, z_range: tuple[float, float], margin: float):
    """The interval of t in [0.15, 0.85] where the artery's axis lies inside the slab, or None."""
    lo, hi = z_range[0] + margin, z_range[1] - margin
    z0, z1 = artery.p0[2], artery.p1[2]
    if abs(z1 - z0) < 1e-6:
        return (0.15, 0.85) if lo <= z0 <= hi else None
    t_a, t_b = sorted(((lo - z0) / (z1 - z0), (hi - z0) / (z1 - z0)))
    t_a, t_b = max(t_a, 0.15), min(t_b, 0.85)
    return (t_a, t_b) if t_a <= t_b else None


def _choose_position(rng, chest: ChestAnatomy, z_range, margin: float):
    """An artery and a position t along it inside the slab (the nearest, for very thin slabs).

    Central (trunk and main) arteries are chosen 60% of the time when the slab holds both
    kinds; there are three central and six lobar arteries.
    """
    arteries = pulmonary_arteries(chest)
    spans = [_positions_in_slab(a, z_range, margin) for a in arteries]
    candidates = [i for i, span in enumerate(spans) if span is not None]
    if not candidates:
        mid = (z_range[0] + z_range[1]) / 2
        index = int(np.argmin([abs(a.point(0.5)[2] - mid) for a in arteries]))
        return arteries, index, 0.5
    weights = np.array([3.0 if i < 3 else 1.0 for i in candidates])
    index = int(rng.choice(candidates, p=weights / weights.sum()))
    return arteries, index, float(rng.uniform(*spans[index]))


def sample_pe_clot(
    rng: np.random.Generator, chest: ChestAnatomy, z_range: tuple[float, float]
) -> PEClot:
    """A filling defect in a main or lobar artery, centred inside the scanned z range.

    Lobar clots are small (a few pixels at 128 px), main-artery clots large; many are eccentric
    (partly occlusive), which is what makes the task hard but not hopeless.
    """
    arteries, index, t = _choose_position(rng, chest, z_range, margin=2.0)
    artery = arteries[index]
    radius = artery.radius * float(rng.uniform(0.6, 0.95))
    half = float(rng.uniform(5.0, 11.0)) / artery.length
    offset = (artery.radius - radius) * float(rng.uniform(-1.0, 1.0))
    # Centred on t, cut at the artery's ends so the thrombus stays inside the vessel.
    p0, p1, r = _segment_inside(artery, max(t - half, 0.02), min(t + half, 0.98), radius, offset)
    return PEClot(Capsule("thrombus", p0, p1, r), index)


def sample_mixing_artifact(
    rng: np.random.Generator, chest: ChestAnatomy, z_range: tuple[float, float]
) -> Capsule:
    """A PE mimic: a streak of less opacified blood along an artery (contrast mixing)."""
    arteries, index, t = _choose_position(rng, chest, z_range, margin=0.0)
    artery = arteries[index]
    radius = artery.radius * float(rng.uniform(0.4, 0.8))
    half = float(rng.uniform(0.1, 0.25))
    p0, p1, r = _segment_inside(artery, max(t - half, 0.02), min(t + half, 0.98), radius, 0.0)
    return Capsule("unopacified_blood", p0, p1, r)


def chest_ct_layers(
    chest: ChestAnatomy, clot: PEClot | None = None, mimic: Capsule | None = None
) -> list[Shape]:
    """The chest as painted layers for CT, from the body wall inwards."""
    s, (a, b), f = chest.scale, chest.body_radii, chest.fat_mm
    long = 1e4  # z radius of structures that run through the whole scanned slab
    hc, hr = chest.heart_center, chest.heart_radii
    layers: list[Shape] = [
        Ellipsoid("fat", (0.0, 0.0, 0.0), (a, b, long)),
        Ellipsoid("muscle", (0.0, 0.0, 0.0), (a - f, b - f, long)),
        RibCage(
            "rib",
            (a - f - 14.0 * s, b - f - 12.0 * s),
            8.0,
            9.0,
            24.0 * s,
            chest.rib_phase_mm,
            (-250.0, 160.0),
        ),
        Ellipsoid("lung", *chest.right_lung),
        Ellipsoid("lung", *chest.left_lung),
        *chest.lung_vessels,
        *(Ellipsoid("muscle", c, r) for c, r in chest.domes),
        Ellipsoid("myocardium", hc, hr),
        Ellipsoid(
            "right_heart",
            (hc[0] - 0.25 * hr[0], hc[1] - 0.15 * hr[1], hc[2]),
            (0.5 * hr[0], 0.55 * hr[1], 0.75 * hr[2]),
        ),
        Ellipsoid(
            "left_heart",
            (hc[0] + 0.35 * hr[0], hc[1] + 0.2 * hr[1], hc[2] - 5 * s),
            (0.42 * hr[0], 0.5 * hr[1], 0.7 * hr[2]),
        ),
        # Ascending aorta, arch and descending aorta.
        Capsule("aorta", (-8.0 * s, -30.0 * s, -60.0 * s), (-8.0 * s, -22.0 * s, 35.0 * s), 15 * s),
        Capsule("aorta", (-8.0 * s, -22.0 * s, 35.0 * s), (22.0 * s, 38.0 * s, 40.0 * s), 13 * s),
        Capsule("aorta", (22.0 * s, 38.0 * s, 40.0 * s), (24.0 * s, 48.0 * s, -260.0), 12 * s),
        *pulmonary_arteries(chest),
        Capsule("pulmonary_vein", (-45.0 * s, 20.0 * s, -40.0 * s), (hc[0], 0.0, -55 * s), 6 * s),
        Capsule("pulmonary_vein", (50.0 * s, 25.0 * s, -35.0 * s), (hc[0], 0.0, -55 * s), 6 * s),
        # Spine: cortical shell, cancellous body, and the canal behind it.
        Ellipsoid("cortical_bone", (0.0, b - f - 38 * s, 0.0), (21 * s, 19 * s, long)),
        Ellipsoid("vertebra", (0.0, b - f - 38 * s, 0.0), (18 * s, 16 * s, long)),
        Ellipsoid("spinal_canal", (0.0, b - f - 12 * s, 0.0), (8 * s, 7 * s, long)),
        Ellipsoid("cortical_bone", (0.0, -b + f + 6 * s, 0.0), (14 * s, 5 * s, long)),
    ]
    if mimic is not None:
        layers.append(mimic)
    if clot is not None:
        layers.append(clot.clot)
    return layers


def _chord(u, v, center_u: float, center_v: float, ru: float, rv: float, depth: float):
    """Path length through an ellipsoid along the viewing axis at detector point (u, v)."""
    q = 1.0 - ((u - center_u) / ru) ** 2 - ((v - center_v) / rv) ** 2
    return 2.0 * depth * np.sqrt(np.clip(q, 0.0, None))


def _band(distance, half_width: float, edge: float):
    return np.clip(0.5 - (np.abs(distance) - half_width) / edge, 0.0, 1.0)


def _round_band(distance, half_width: float):
    """Relative path length across a cylinder seen side-on: 1 at its axis, 0 at its edges."""
    return np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, None))


def chest_projection_paths(
    chest: ChestAnatomy,
    x,
    z,
    magnification: Mapping[str, float],
    lung_texture=None,
) -> dict[str, np.ndarray]:
    """Path lengths (mm) per material of a frontal (PA/AP) chest projection.

    x, z: detector coordinates (mm, origin on the projected carina). Each group of structures
    is demagnified by its own factor (magnification["thorax"], ["heart"], ["spine"]): the
    further a structure is from the detector the larger it projects, which is how an AP view
    enlarges the heart relative to the chest wall.
    lung_texture: optional field in [0, 1) of vascular markings that replace some lung air.
    """
    (a, b), s = chest.body_radii, chest.scale
    mt, mh = magnification["thorax"], magnification["heart"]
    xt, zt = x / mt, z / mt
    # Trunk: an elliptic cylinder up to the shoulders with a rounded top, the neck above it.
    shoulder = 150.0 * s
    trunk = np.where(
        zt < shoulder,
        _chord(xt, 0.0, 0.0, 0.0, a, 1.0, b),
        _chord(xt, zt, 0.0, shoulder, a, 45.0 * s, b),
    )
    neck = _chord(xt, 0.0, 0.0, 0.0, 55.0 * s, 1.0, 50.0 * s) * (zt > shoulder - 20 * s)
    soft = np.maximum(trunk, neck)
    if chest.female:
        for side in (-1.0, 1.0):
            soft = soft + _chord(xt, zt, side * 75 * s, -125 * s, 90 * s, 70 * s, 14 * s)
    xh, zh = x / mh, z / mh
    hc, hr = chest.heart_center, chest.heart_radii
    heart = _chord(xh, zh, hc[0], hc[2], hr[0], hr[2], hr[1])
    air = np.zeros_like(soft)
    lungs = (chest.right_lung, chest.left_lung)
    for (center, radii), (dc, dr) in zip(lungs, chest.domes, strict=True):
        lung = _chord(xt, zt, center[0], center[2], radii[0], radii[2], radii[1])
        dome = _chord(xt, zt, dc[0], dc[2], dr[0], dr[2], dr[1])
        air = air + np.clip(lung - heart - dome, 0.0, None)
    if lung_texture is not None:
        air = air * (1.0 - lung_texture)
    ms = magnification["spine"]
    xs, zs = x / ms, z / ms
    spine = 30.0 * s * _round_band(xs, 18.0 * s) * (zs < shoulder + 40)
    # Ribs: cortical shells a few mm thick in projection, thickest along their axis.
    ribs = np.zeros_like(soft)
    ax = np.abs(xt)
    for k in range(12):
        level = 130.0 * s - k * 24.0 * s - chest.rib_phase_mm
        # Posterior ribs leave the spine rising, then arc down along the chest wall.
        centre = level + 0.3 * ax - 0.0035 * ax**2
        lateral = (ax > 12 * s) & (ax < 0.92 * a)
        ribs = ribs + 4.0 * _round_band(zt - centre, 5.5 * s) * lateral
    clavicle = 0.25 * ax + 125.0 * s
    ribs = ribs + 6.0 * _round_band(zt - clavicle, 6.0 * s) * (ax > 15 * s) * (ax < 0.8 * a)
    bone = ribs + spine
    return {
        # Bone displaces soft tissue along the ray; it does not add to the patient's thickness.
        "soft_tissue": np.clip(soft - air - bone, 0.0, None),
        "lung": air,
        "cortical_bone": ribs,
        "trabecular_bone": spine,
    }


# --------------------------------------------------------------------------------------------
# Brain


@dataclasses.dataclass(frozen=True)
class Glioma:
    """A glioma. aggressiveness in [0, 1] is the score; grade is high above 0.5."""

    aggressiveness: float
    center: Vec3
    radius_mm: float
    edema_radius_mm: float
    necrosis_radius_mm: float  # 0: no necrotic core
    rim_mm: float  # 0: no enhancing rim
    waves: tuple[tuple[float, float, float, float], ...]

    @property
    def high_grade(self) -> bool:
        return self.aggressiveness > 0.5


@dataclasses.dataclass(frozen=True)
class BrainAnatomy:
    """One patient's head. Ventricles widen with age."""

    radii: Vec3  # the brain's (inside the CSF space)
    ventricle_width_mm: float
    cortex_waves: tuple[tuple[float, float, float, float], ...]
    glioma: Glioma | None


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_glioma(rng: np.random.Generator, radii: Vec3, aggressiveness: float) -> Glioma:
    """A glioma whose size, edema, necrosis and enhancement grow with aggressiveness.

    Each feature is a noisy function of aggressiveness, so the grade is learnable from the image
    but cases near the threshold look alike.
    """
    a = aggressiveness
    side = float(rng.choice([-1.0, 1.0]))
    radius = float(np.clip(6.0 + 12.0 * a + rng.normal(0, 2.5), 4.0, 22.0))
    edema = radius * float(np.clip(1.1 + 0.7 * a + rng.normal(0, 0.15), 1.0, 2.0))
    necrosis = 0.0
    if rng.random() < _sigmoid((a - 0.55) * 12.0):
        necrosis = radius * float(rng.uniform(0.3, 0.6))
    rim = 0.0
    if rng.random() < _sigmoid((a - 0.5) * 10.0):
        rim = float(rng.uniform(2.5, 5.0))
    # Keep the tumour inside the brain: its centre lies in the deep white matter.
    rx, ry, rz = radii
    center = (
        side * float(rng.uniform(0.25, 0.5)) * rx,
        float(rng.uniform(-0.45, 0.45)) * ry,
        float(rng.uniform(-0.1, 0.4)) * rz,
    )
    return Glioma(a, center, radius, edema, necrosis, rim, _random_waves(rng, 3, 3.0))


def sample_brain(rng: np.random.Generator, age_years: float, aggressiveness: float | None):
    """A head of random size; with a glioma when aggressiveness is given."""
    size = float(rng.uniform(0.92, 1.06))
    radii = (66.0 * size, 84.0 * size, 58.0 * size)
    ventricles = float(np.clip(5.0 + 0.09 * (age_years - 20) + rng.normal(0, 1.0), 4.0, 14.0))
    glioma = None if aggressiveness is None else sample_glioma(rng, radii, aggressiveness)
    return BrainAnatomy(radii, ventricles, _random_waves(rng, 12, 22.0), glioma)


def brain_layers(brain: BrainAnatomy) -> list[Shape]:
    """The head as painted layers: scalp, skull, CSF, cortex, white matter, deep structures."""
    rx, ry, rz = brain.radii
    o = (0.0, 0.0, 0.0)
    v = brain.ventricle_width_mm
    layers: list[Shape] = [
        Ellipsoid("fat", o, (rx + 13, ry + 13, rz + 13)),
        Ellipsoid("bone", o, (rx + 8, ry + 8, rz + 8)),
        Ellipsoid("csf", o, (rx + 2.5, ry + 2.5, rz + 2.5)),
        FoldedEllipsoid("gm", o, (rx, ry, rz), brain.cortex_waves, 0.035),
        FoldedEllipsoid("wm", o, (rx - 9, ry - 9, rz - 9), brain.cortex_waves, 0.09),
        Ellipsoid("gm", (-21.0, -2.0, 0.0), (9.0, 17.0, 11.0)),  # basal ganglia
        Ellipsoid("gm", (21.0, -2.0, 0.0), (9.0, 17.0, 11.0)),
        Ellipsoid("gm", (-9.0, 14.0, 2.0), (8.0, 12.0, 9.0)),  # thalami
        Ellipsoid("gm", (9.0, 14.0, 2.0), (8.0, 12.0, 9.0)),
        Ellipsoid("csf", (-v * 0.9 - 2, -4.0, 14.0), (v, 30.0, 9.0 + v * 0.3)),
        Ellipsoid("csf", (v * 0.9 + 2, -4.0, 14.0), (v, 30.0, 9.0 + v * 0.3)),
        Ellipsoid("csf", (0.0, 6.0, 2.0), (2.0, 14.0, 8.0)),  # third ventricle
    ]
    g = brain.glioma
    if g is not None:
        lesion: list[Shape] = [
            FoldedEllipsoid("edema", g.center, (g.edema_radius_mm,) * 3, g.waves, 0.15)
        ]
        outer = "enhancing_tumor" if g.rim_mm > 0 else "tumor"
        lesion.append(FoldedEllipsoid(outer, g.center, (g.radius_mm,) * 3, g.waves, 0.1))
        if g.rim_mm > 0:
            inner = max(g.radius_mm - g.rim_mm, 1.0)
            lesion.append(FoldedEllipsoid("tumor", g.center, (inner,) * 3, g.waves, 0.1))
        if g.necrosis_radius_mm > 0:
            lesion.append(Ellipsoid("necrosis", g.center, (g.necrosis_radius_mm,) * 3))
        brain_volume = Ellipsoid("wm", o, (rx - 1, ry - 1, rz - 1))
        layers.extend(Within(shape, brain_volume) for shape in lesion)
    return layers


# --------------------------------------------------------------------------------------------
# Abdomen, for ultrasound


@dataclasses.dataclass(frozen=True)
class Ellipse2D:
    """An ellipse in the ultrasound image plane (lateral x, depth y; mm) with an echogenicity."""

    echo: float
    center: tuple[float, float]
    radii: tuple[float, float]
    angle: float

    def occupancy(self, x, y, edge_mm: float):
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.center[0], y - self.center[1]
        u, w = (c * dx + s * dy) / self.radii[0], (-s * dx + c * dy) / self.radii[1]
        return _soft_edge((np.sqrt(u * u + w * w) - 1.0) * min(self.radii), edge_mm)


def sample_abdomen_scene(rng: np.random.Generator, depth_mm: float) -> list[Ellipse2D]:
    """Liver with vessels, and a kidney or gallbladder, as seen by a curved probe."""
    scene = [Ellipse2D(0.55, (0.0, depth_mm * 0.55), (depth_mm * 0.9, depth_mm * 0.45), 0.0)]
    for _ in range(int(rng.integers(3, 7))):  # hepatic and portal veins: anechoic
        r = float(rng.uniform(2.5, 7.0))
        c = (float(rng.uniform(-0.4, 0.4) * depth_mm), float(rng.uniform(0.3, 0.8) * depth_mm))
        scene.append(Ellipse2D(0.01, c, (r * rng.uniform(1.0, 2.5), r), rng.uniform(0, np.pi)))
    if rng.random() < 0.5:  # kidney: bright sinus inside a darker cortex
        c = (float(rng.uniform(-0.2, 0.2) * depth_mm), float(rng.uniform(0.65, 0.8) * depth_mm))
        angle = float(rng.uniform(-0.4, 0.4))
        scene.append(Ellipse2D(0.3, c, (0.28 * depth_mm, 0.13 * depth_mm), angle))
        scene.append(Ellipse2D(0.9, c, (0.15 * depth_mm, 0.05 * depth_mm), angle))
    else:  # gallbladder: anechoic with a bright wall
        c = (float(rng.uniform(-0.25, 0.25) * depth_mm), float(rng.uniform(0.35, 0.5) * depth_mm))
        radii = (0.16 * depth_mm, 0.07 * depth_mm)
        scene.append(Ellipse2D(1.0, c, (radii[0] + 1.5, radii[1] + 1.5), 0.2))
        scene.append(Ellipse2D(0.008, c, radii, 0.2))
    return scene
