"""Volume assembly: order the slices of a series along their normal and resample to a grid.

Planning needs headers only (FrameGeometry); resampling takes slices already normalised to
[0, 1]. Runs in spawned preprocessing workers: numpy and Pillow only (no jax).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from pgjax.data.pixels import FrameGeometry, fitted_size, resize_image

# Direction cosines written by scanners agree to ~1e-5 within a series; 1e-3 (about 0.06
# degrees) tolerates rounding but not a re-planned stack.
ORIENTATION_TOLERANCE = 1e-3
# Two slices closer than this along the normal are at the same position.
DUPLICATE_TOLERANCE_MM = 1e-3
# A gap more than 10% away from the median gap (a missing slice, a change of spacing) makes
# the spacing irregular; resampling handles it, but it is recorded.
IRREGULAR_GAP_FRACTION = 0.1
# Relative tolerance for pixel spacing agreeing between slices.
SPACING_TOLERANCE = 1e-3


class InconsistentSeries(ValueError):
    """The slices of a series do not form one volume; the message says why."""


@dataclasses.dataclass(frozen=True)
class VolumePlan:
    """How to stack a series' slices: their order and positions along the slice normal."""

    order: tuple[int, ...]  # indices into the input slices, ascending along the normal
    positions_mm: tuple[float, ...]  # sorted positions along the normal
    normal: tuple[float, float, float]  # unit normal: row cosines x column cosines
    slice_spacing_mm: float  # median gap between consecutive slices
    spacing_irregular: bool
    pixel_spacing: tuple[float, float] | None  # (row_mm, col_mm)
    rows: int
    cols: int

    def to_json(self) -> dict[str, Any]:
        """A plain dict of lists, numbers, booleans and None."""
        return {
            "order": list(self.order),
            "positions_mm": list(self.positions_mm),
            "normal": list(self.normal),
            "slice_spacing_mm": self.slice_spacing_mm,
            "spacing_irregular": self.spacing_irregular,
            "pixel_spacing": None if self.pixel_spacing is None else list(self.pixel_spacing),
            "rows": self.rows,
            "cols": self.cols,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> VolumePlan:
        """Inverse of `to_json`."""
        spacing = obj.get("pixel_spacing")
        return cls(
            order=tuple(int(i) for i in obj["order"]),
            positions_mm=tuple(float(p) for p in obj["positions_mm"]),
            normal=tuple(float(v) for v in obj["normal"]),
            slice_spacing_mm=float(obj["slice_spacing_mm"]),
            spacing_irregular=bool(obj["spacing_irregular"]),
            pixel_spacing=None if spacing is None else tuple(float(v) for v in spacing),
            rows=int(obj["rows"]),
            cols=int(obj["cols"]),
        )


def plan_volume(geoms: Sequence[FrameGeometry], min_slices: int) -> VolumePlan:
    """Check that `geoms` form one stack of parallel slices and sort them along the normal.

    All slices must share rows/cols, orientation (within ORIENTATION_TOLERANCE per cosine) and
    pixel spacing; every slice needs a position; no two may share a position (the caller has
    already removed repeated SOP instances). Raises InconsistentSeries with the reason.
    """
    min_slices = max(int(min_slices), 2)  # a spacing needs two slices
    if len(geoms) < min_slices:
        raise InconsistentSeries(f"fewer than {min_slices} slices ({len(geoms)})")
    first = geoms[0]
    for g in geoms[1:]:
        if (g.rows, g.cols) != (first.rows, first.cols):
            raise InconsistentSeries(
                f"slice size differs ({first.rows}x{first.cols} vs {g.rows}x{g.cols})"
            )
    if any(g.position is None for g in geoms):
        raise InconsistentSeries("missing ImagePositionPatient")
    if any(g.orientation is None for g in geoms):
        raise InconsistentSeries("missing ImageOrientationPatient")
    orientations = np.array([g.orientation for g in geoms], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise InconsistentSeries("orientation differs between slices")
    pixel_spacing = _common_pixel_spacing(geoms)

    row_cosines, col_cosines = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cosines, col_cosines)
    norm = np.linalg.norm(normal)
    if norm < 0.5:  # unit cosines at right angles give norm 1
        raise InconsistentSeries("degenerate ImageOrientationPatient (rows parallel to columns)")
    normal /= norm

    along = np.array([g.position for g in geoms], dtype=np.float64) @ normal
    order = np.argsort(along, kind="stable")
    positions = along[order]
    gaps = np.diff(positions)
    if gaps.min() < DUPLICATE_TOLERANCE_MM:
        at = positions[int(np.argmin(gaps))]
        raise InconsistentSeries(f"duplicate slice positions (two slices at {at:.3f} mm)")
    spacing = float(np.median(gaps))
    irregular = bool(np.abs(gaps - spacing).max() > IRREGULAR_GAP_FRACTION * spacing)
    return VolumePlan(
        order=tuple(int(i) for i in order),
        positions_mm=tuple(float(p) for p in positions),
        normal=tuple(float(v) for v in normal),
        slice_spacing_mm=spacing,
        spacing_irregular=irregular,
        pixel_spacing=pixel_spacing,
        rows=first.rows,
        cols=first.cols,
    )


def _common_pixel_spacing(geoms: Sequence[FrameGeometry]) -> tuple[float, float] | None:
    spacing = geoms[0].pixel_spacing
    for g in geoms[1:]:
        other = g.pixel_spacing
        same = (spacing is None and other is None) or (
            spacing is not None
            and other is not None
            and np.allclose(spacing, other, rtol=SPACING_TOLERANCE, atol=0)
        )
        if not same:
            raise InconsistentSeries(f"pixel spacing differs ({spacing} vs {other})")
    return spacing


def resample_volume(
    slices: np.ndarray,
    plan: VolumePlan,
    out_shape: tuple[int, int, int],
    resize_mode: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Resample normalised slices (float32 [S, rows, cols], in plan order) to `out_shape`.

    Each slice is resized in-plane with `resize_image` (letterbox uses the pixel spacing), then
    the stack is linearly interpolated along the normal onto out_shape[0] evenly spaced
    positions from the first to the last slice, using the true slice positions, so a missing
    slice is bridged by interpolation rather than squeezed out. Returns the float32 volume
    [D, H, W] and the spacing facts to record (JSON-able): the input slice spacing, the output
    voxel spacing (mm along the normal, rows, cols; None where unknown), the extent along the
    normal and the irregular-spacing flag.
    """
    slices = np.asarray(slices, dtype=np.float32)
    expected = (len(plan.order), plan.rows, plan.cols)
    if slices.shape != expected:
        raise ValueError(f"slices have shape {slices.shape}, the plan expects {expected}")
    depth, height, width = (int(n) for n in out_shape)
    if min(depth, height, width) < 1:
        raise ValueError(f"out_shape must be positive, got {out_shape}")

    in_plane = np.stack(
        [resize_image(s, (height, width), resize_mode, plan.pixel_spacing) for s in slices]
    )

    positions = np.asarray(plan.positions_mm, dtype=np.float64)
    targets = np.linspace(positions[0], positions[-1], depth)
    # Index of the slice at or below each target; the last interval is closed on the right.
    lower = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, len(positions) - 2)
    weight = (targets - positions[lower]) / (positions[lower + 1] - positions[lower])
    weight = np.clip(weight, 0.0, 1.0).astype(np.float32)[:, None, None]
    # (1 - w) * below + w * above, in place on the two gathered copies.
    volume = in_plane[lower]
    volume *= 1.0 - weight
    above = in_plane[lower + 1]
    above *= weight
    volume += above

    extent = float(positions[-1] - positions[0])
    return volume.astype(np.float32, copy=False), {
        "input_slice_spacing_mm": plan.slice_spacing_mm,
        "output_spacing_mm": [
            extent / (depth - 1) if depth > 1 else None,
            *_in_plane_spacing(plan, (height, width), resize_mode),
        ],
        "extent_mm": extent,
        "spacing_irregular": plan.spacing_irregular,
    }


def _in_plane_spacing(
    plan: VolumePlan, size: tuple[int, int], resize_mode: str
) -> tuple[float | None, float | None]:
    """mm between output rows and between output columns after the in-plane resize."""
    if plan.pixel_spacing is None:
        return None, None
    row_mm, col_mm = plan.pixel_spacing
    if resize_mode == "letterbox":
        size = fitted_size((plan.rows, plan.cols), size, plan.pixel_spacing)
    return plan.rows * row_mm / size[0], plan.cols * col_mm / size[1]
