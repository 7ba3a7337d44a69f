"""Volume planning and resampling: synthetic stacks with known geometry, and real series."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files

from pgjax.data.config import PreprocessConfig
from pgjax.data.pixels import FrameGeometry, decode_frames, frame_geometry, normalize_series
from pgjax.data.volumes import InconsistentSeries, VolumePlan, plan_volume, resample_volume

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def stack(
    positions_mm,
    orientation=AXIAL,
    origin=(-100.0, -120.0, 30.0),
    size=(8, 8),
    pixel_spacing=(0.5, 0.5),
) -> list[FrameGeometry]:
    """Slices at the given distances along the normal of `orientation` from `origin`."""
    normal = np.cross(orientation[:3], orientation[3:])
    return [
        FrameGeometry(
            position=tuple(float(v) for v in np.asarray(origin) + d * normal),
            orientation=tuple(orientation),
            pixel_spacing=pixel_spacing,
            rows=size[0],
            cols=size[1],
            slice_thickness=1.0,
        )
        for d in positions_mm
    ]


def oblique(degrees: float) -> tuple[float, ...]:
    """Axial orientation tilted about the patient x axis."""
    a = np.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))


def series(pattern: str) -> list[pydicom.Dataset]:
    paths = get_testdata_files(pattern)
    if not paths:
        pytest.skip(f"no pydicom test files match {pattern}")
    return [pydicom.dcmread(p) for p in paths]


# --------------------------------------------------------------------------------------------
# Planning


def test_shuffled_slices_come_out_sorted():
    depths = np.arange(10) * 2.5
    shuffled = np.random.default_rng(1).permutation(depths)
    plan = plan_volume(stack(shuffled), min_slices=8)
    assert [shuffled[i] for i in plan.order] == sorted(depths)
    # Positions are along the normal: origin z (30 mm) plus the depth.
    np.testing.assert_allclose(plan.positions_mm, 30.0 + depths)
    assert plan.normal == (0.0, 0.0, 1.0)
    assert plan.slice_spacing_mm == pytest.approx(2.5)
    assert not plan.spacing_irregular
    assert (plan.rows, plan.cols, plan.pixel_spacing) == (8, 8, (0.5, 0.5))


def test_oblique_stack():
    orientation = oblique(30)
    geoms = stack([6.0, 0.0, 3.0, 9.0], orientation=orientation)
    plan = plan_volume(geoms, min_slices=4)
    assert plan.order == (1, 2, 0, 3)
    np.testing.assert_allclose(plan.normal, [0, -np.sin(np.radians(30)), np.cos(np.radians(30))])
    np.testing.assert_allclose(np.diff(plan.positions_mm), 3.0)
    assert plan.slice_spacing_mm == pytest.approx(3.0)


def test_missing_slice_is_irregular():
    depths = [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0]  # 4.0 is missing
    plan = plan_volume(stack(depths), min_slices=8)
    assert plan.spacing_irregular
    assert plan.slice_spacing_mm == pytest.approx(1.0)


def test_plan_round_trips_json_and_pickle():
    plan = plan_volume(stack([0.0, 1.5, 3.0], orientation=oblique(10)), min_slices=3)
    assert VolumePlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan


@pytest.mark.parametrize(
    "geoms, reason",
    [
        (stack([0, 1]) + stack([2], size=(4, 8)), r"slice size differs \(8x8 vs 4x8\)"),
        (stack([0, 1]) + stack([2], orientation=oblique(5)), "orientation differs"),
        (stack([0, 1, 1.0005, 2]), "duplicate slice positions"),
        (stack([0, 1]) + [FrameGeometry(None, AXIAL, (0.5, 0.5), 8, 8)], "ImagePositionPatient"),
        (stack([0, 1]) + [FrameGeometry((0, 0, 2), None, None, 8, 8)], "ImageOrientationPatient"),
        (stack([0, 1]) + stack([2], pixel_spacing=(0.7, 0.7)), "pixel spacing differs"),
        (stack([0, 1], orientation=(1, 0, 0, 1, 0, 0)), "degenerate"),
    ],
)
def test_inconsistent_series_raise_with_reason(geoms, reason):
    with pytest.raises(InconsistentSeries, match=reason):
        plan_volume(geoms, min_slices=2)


def test_too_few_slices():
    with pytest.raises(InconsistentSeries, match=r"fewer than 8 slices \(5\)"):
        plan_volume(stack(range(5)), min_slices=8)
    with pytest.raises(InconsistentSeries, match="fewer than 2 slices"):
        plan_volume(stack([0]), min_slices=1)


def test_real_ct_series_in_reverse_file_order():
    slices = series("dicomdirtests/98892001/CT5N/*")
    geoms = [frame_geometry(ds)[0] for ds in slices]
    plan = plan_volume(geoms, min_slices=5)
    z = [float(slices[i].ImagePositionPatient[2]) for i in plan.order]
    assert z == sorted(z)
    assert plan.slice_spacing_mm == pytest.approx(2.5, abs=1e-4)
    assert not plan.spacing_irregular


def test_real_ct_series_with_a_gap_is_irregular():
    geoms = [frame_geometry(ds)[0] for ds in series("dicomdirtests/77654033/CT2/*")]
    plan = plan_volume(geoms, min_slices=4)  # z = -99.48, then 103.02 to 105.52
    assert plan.spacing_irregular
    assert plan.slice_spacing_mm == pytest.approx(1.25, abs=1e-4)


def test_real_radial_mr_series_has_differing_orientations():
    geoms = [frame_geometry(ds)[0] for ds in series("dicomdirtests/98892003/MR700/*")]
    with pytest.raises(InconsistentSeries, match="orientation differs"):
        plan_volume(geoms, min_slices=2)


# --------------------------------------------------------------------------------------------
# Resampling


def ramp_slices(plan: VolumePlan, scale: float = 0.01) -> np.ndarray:
    """Each slice constant, equal to its position along the normal times `scale`."""
    values = np.asarray(plan.positions_mm, dtype=np.float32) * scale
    return np.broadcast_to(values[:, None, None], (len(values), plan.rows, plan.cols)).copy()


def test_resampling_a_linear_ramp_reproduces_it():
    plan = plan_volume(stack(np.arange(9) * 2.0, origin=(0, 0, 0)), min_slices=8)
    volume, facts = resample_volume(ramp_slices(plan), plan, (17, 4, 4), "stretch")
    assert volume.shape == (17, 4, 4) and volume.dtype == np.float32
    np.testing.assert_allclose(volume[:, 2, 2], np.linspace(0.0, 0.16, 17), atol=1e-6)
    assert facts["output_spacing_mm"][0] == pytest.approx(1.0)
    assert facts["extent_mm"] == pytest.approx(16.0)
    assert facts["input_slice_spacing_mm"] == pytest.approx(2.0)
    assert facts["spacing_irregular"] is False


def test_missing_slice_is_bridged_linearly():
    depths = [0.0, 1.0, 2.0, 3.0, 7.0, 8.0, 9.0, 10.0]  # 4, 5 and 6 are missing
    plan = plan_volume(stack(depths, origin=(0, 0, 0)), min_slices=8)
    volume, facts = resample_volume(ramp_slices(plan), plan, (11, 8, 8), "letterbox")
    # Linear interpolation of a linear function is exact, even across the gap.
    np.testing.assert_allclose(volume[:, 4, 4], np.arange(11) * 0.01, atol=1e-6)
    assert facts["spacing_irregular"] is True


def test_resampling_interpolates_between_slices_not_by_index():
    # Slice values 0, 1, 0 at depths 0, 1, 4: at depth 2 the value is 2/3 of the way to 0.
    plan = plan_volume(stack([0.0, 1.0, 4.0], origin=(0, 0, 0)), min_slices=3)
    slices = np.zeros((3, 8, 8), dtype=np.float32)
    slices[1] = 1.0
    volume, _ = resample_volume(slices, plan, (5, 8, 8), "stretch")
    np.testing.assert_allclose(volume[:, 0, 0], [0.0, 1.0, 2 / 3, 1 / 3, 0.0], atol=1e-6)


def test_in_plane_letterbox_uses_pixel_spacing():
    # 16 rows x 8 cols with rows 0.5 mm apart and columns 1 mm apart: 8 mm x 8 mm, square.
    geoms = stack([0.0, 1.0], size=(16, 8), pixel_spacing=(0.5, 1.0))
    plan = plan_volume(geoms, min_slices=2)
    slices = np.ones((2, 16, 8), dtype=np.float32)
    volume, facts = resample_volume(slices, plan, (2, 4, 4), "letterbox")
    np.testing.assert_allclose(volume, 1.0)  # fills the square output: no padding
    assert facts["output_spacing_mm"] == pytest.approx([1.0, 2.0, 2.0])
    # Into a 4 x 8 output, letterboxing pads the sides and keeps 2 mm voxels; stretching
    # gives 2 mm rows and 1 mm columns.
    padded, boxed = resample_volume(slices, plan, (2, 4, 8), "letterbox")
    assert boxed["output_spacing_mm"] == pytest.approx([1.0, 2.0, 2.0])
    np.testing.assert_array_equal(padded[:, :, :2], 0.0)
    _, stretched = resample_volume(slices, plan, (2, 4, 8), "stretch")
    assert stretched["output_spacing_mm"] == pytest.approx([1.0, 2.0, 1.0])


def test_resample_checks_the_slice_count():
    plan = plan_volume(stack([0.0, 1.0, 2.0]), min_slices=3)
    with pytest.raises(ValueError, match="plan expects"):
        resample_volume(np.zeros((2, 8, 8), dtype=np.float32), plan, (4, 4, 4), "stretch")


def test_real_ct_series_end_to_end():
    slices = series("dicomdirtests/98892001/CT5N/*")
    plan = plan_volume([frame_geometry(ds)[0] for ds in slices], min_slices=5)
    ordered = [slices[i] for i in plan.order]
    images = normalize_series([(decode_frames(ds), ds) for ds in ordered], PreprocessConfig())
    volume, facts = resample_volume(images, plan, (9, 32, 32), "letterbox")
    assert volume.shape == (9, 32, 32) and 0.0 <= volume.min() and volume.max() <= 1.0
    # Every other output slice lands exactly on an input slice (4 gaps -> 8 steps).
    np.testing.assert_allclose(
        volume[::2], resample_volume(images, plan, (5, 32, 32), "letterbox")[0], atol=1e-6
    )
    assert facts["output_spacing_mm"][0] == pytest.approx(1.25, abs=1e-4)
    assert facts["output_spacing_mm"][1] == pytest.approx(16 * 0.488281 / 32)
