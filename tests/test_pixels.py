"""Pixel decoding, normalisation, resizing and frame geometry on pydicom's real test files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_voi, apply_windowing, pixel_array
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from pgjax.data import pixels
from pgjax.data.config import PreprocessConfig
from pgjax.data.pixels import (
    FrameGeometry,
    PixelError,
    decode_frames,
    frame_geometry,
    modality_values,
    normalize_frames,
    normalize_series,
    normalized_frames,
    preprocess_frames,
    quantize,
    resize_image,
)

CFG = PreprocessConfig()
LUMA = np.array([0.299, 0.587, 0.114])

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on odd test files


def data_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in pydicom's test data (install pydicom-data)")
    return path


def read(name: str, **kwargs) -> Dataset:
    return pydicom.dcmread(data_file(name), **kwargs)


# --------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR little endian, signed 16 bit
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated explicit VR little endian
        "MR_small_RLE.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "emri_small.dcm",  # multi-frame
        "SC_rgb.dcm",
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG baseline YBR_FULL_422
    ],
)
def test_decode_equals_pydicom_pixel_array(name):
    ds = read(name)
    expected = ds.pixel_array
    single_frame = pixels.number_of_frames(ds) == 1
    got = decode_frames(ds)
    assert got.shape == ((1, *expected.shape) if single_frame else expected.shape)
    np.testing.assert_array_equal(got[0] if single_frame else got, expected)
    assert got.dtype.isnative


@pytest.mark.parametrize(
    "reference, twin",
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
        ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless, RGB
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # JPEG 2000 YBR_RCT -> RGB
    ],
)
def test_lossless_variants_equal_their_uncompressed_twin(reference, twin):
    expected = decode_frames(read(reference))
    got = decode_frames(read(twin))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "reference, twin, max_mean_error",
    [
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 2.0),  # JPEG baseline YBR_FULL
        ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 5.0),  # JPEG baseline YBR_FULL_422
        ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 2.0),  # native YBR -> RGB
        ("US1_UNCR.dcm", "US1_J2KI.dcm", 3.0),  # JPEG 2000 lossy, YBR_ICT
    ],
)
def test_lossy_and_ybr_variants_are_close_rgb(reference, twin, max_mean_error):
    expected = decode_frames(read(reference)).astype(np.float64)
    got = decode_frames(read(twin)).astype(np.float64)
    assert got.shape == expected.shape and got.shape[-1] == 3
    error = np.abs(got - expected)
    assert error.mean() < max_mean_error
    assert error.max() > 0  # really lossy: the test compares different data


def test_frame_selection_matches_full_decode():
    for name in ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"):
        ds = read(name)
        full = decode_frames(ds)
        np.testing.assert_array_equal(decode_frames(ds, [7, 2, 7]), full[[7, 2, 7]])


def test_frame_selection_decodes_only_the_asked_frames(monkeypatch):
    path = data_file("color3d_jpeg_baseline.dcm")  # 120 frames of US colour, JPEG baseline
    ds = pydicom.dcmread(path)
    asked = []
    real_get_decoder = pixels.get_decoder

    class Spy:
        def __init__(self, decoder):
            self.decoder = decoder
            self.is_available = decoder.is_available

        def as_array(self, src, index=None, **kwargs):
            asked.append(index)
            return self.decoder.as_array(src, index=index, **kwargs)

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: Spy(real_get_decoder(uid)))
    got = decode_frames(ds, [119, 3])
    assert asked == [119, 3]
    assert got.shape == (2, 480, 640, 3)
    # Compare with pydicom's own single-frame path, read straight from the file.
    np.testing.assert_array_equal(got[0], pixel_array(path, index=119))
    np.testing.assert_array_equal(got[1], pixel_array(path, index=3))


def test_truncated_native_pixel_data(tmp_path):
    ds = read("MR_small.dcm")
    ds.PixelData = ds.PixelData[:8000]
    path = tmp_path / "short.dcm"
    ds.save_as(path)
    with pytest.raises(
        PixelError, match=r"^truncated pixel data: expected 8192 bytes, found 8000$"
    ):
        decode_frames(pydicom.dcmread(path))


def test_truncated_compressed_pixel_data():
    ds = read("emri_small_jpeg_2k_lossless.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(PixelError, match="^truncated pixel data: fewer compressed fragments"):
        decode_frames(ds)


def test_undecodable_jpeg_names_the_plugin_errors():
    # A 12-bit JPEG extended file that neither libjpeg nor Pillow can decode.
    with pytest.raises(PixelError, match="^cannot decode: .*pylibjpeg.*pillow"):
        decode_frames(read("JPEG-lossy.dcm"))


def test_corrupt_compressed_frame_is_reported():
    ds = read("MR_small_RLE.dcm")
    ds.PixelData = ds.PixelData[:-1000]
    with pytest.raises(PixelError, match="^cannot decode: .*RLE"):
        decode_frames(ds)


def test_header_only_dataset_has_no_pixel_data():
    ds = read("CT_small.dcm", stop_before_pixels=True)
    with pytest.raises(PixelError, match="^no pixel data$"):
        decode_frames(ds)


def test_unknown_transfer_syntax():
    ds = read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    with pytest.raises(PixelError, match=r"^unsupported transfer syntax 1\.2\.826.* \(unknown\)"):
        decode_frames(ds)


def test_known_transfer_syntax_without_decoder():
    ds = read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    with pytest.raises(PixelError, match="MPEG2.*pydicom has no decoder"):
        decode_frames(ds)


def test_missing_plugin_names_what_to_install(monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: Unavailable())
    ds = read("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(PixelError, match=r"\(JPEG-LS Lossless .*install pylibjpeg - requires"):
        decode_frames(ds)


def test_frame_out_of_range():
    with pytest.raises(PixelError, match="frame 10 out of range: the object has 10 frame"):
        decode_frames(read("emri_small.dcm"), [10])


# --------------------------------------------------------------------------------------------
# Normalisation


def test_ct_hounsfield_units_and_window():
    ds = read("CT_small.dcm")
    stored = decode_frames(ds)
    hu = modality_values(stored, ds)
    np.testing.assert_allclose(hu, stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))

    center, width = CFG.ct_window
    # Stored values whose HU are the window centre and edges (and beyond).
    wanted_hu = np.array([[[center, center - width / 2, center + width / 2, -1000.0, 3000.0]]])
    probe = ((wanted_hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)).astype(np.int16)
    np.testing.assert_allclose(normalize_frames(probe, ds, CFG), [[[0.5, 0, 1, 0, 1]]])

    out = normalize_frames(stored, ds, CFG)
    assert out.dtype == np.float32 and out.shape == stored.shape
    np.testing.assert_allclose(out, np.clip((hu - center) / width + 0.5, 0, 1), atol=1e-6)


def test_enhanced_ct_rescale_from_functional_groups():
    ds = read("eCT_Supplemental.dcm")
    assert "RescaleIntercept" not in ds  # only in the shared functional group
    stored = decode_frames(ds)
    np.testing.assert_allclose(modality_values(stored, ds), stored.astype(np.float64) - 1024)

    # A per-frame group overrides the shared one for that frame only.
    transform = Dataset()
    transform.RescaleSlope = 2
    transform.RescaleIntercept = -1000
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = Sequence([transform])
    probe = np.full((2, 2, 2), 100, dtype=np.uint16)
    values = modality_values(probe, ds, indices=[0, 1])
    np.testing.assert_allclose(values[:, 0, 0], [100 - 1024, 2 * 100 - 1000])
    np.testing.assert_allclose(modality_values(probe[:1], ds, indices=[1]), -800)


def test_modality_lut_sequence_is_applied():
    ds = read("mlut_18.dcm")
    stored = decode_frames(ds)
    np.testing.assert_array_equal(
        modality_values(stored, ds)[0], pydicom.pixels.apply_modality_lut(stored[0], ds)
    )


def as_projection(name: str, **attributes) -> Dataset:
    ds = read(name)
    ds.Modality = "DX"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_monochrome1_is_inverted(tmp_path):
    mono2 = as_projection("MR_small.dcm")
    mono2.save_as(tmp_path / "mono2.dcm")
    mono2.PhotometricInterpretation = "MONOCHROME1"
    mono2.save_as(tmp_path / "mono1.dcm")
    bright = normalized_frames(pydicom.dcmread(tmp_path / "mono2.dcm"), None, CFG)
    inverted = normalized_frames(pydicom.dcmread(tmp_path / "mono1.dcm"), None, CFG)
    assert bright.std() > 0.1
    np.testing.assert_allclose(inverted, 1.0 - bright, atol=1e-6)


def test_monochrome1_ct_is_not_inverted():
    ds = read("CT_small.dcm")
    stored = decode_frames(ds)
    expected = normalize_frames(stored, ds, CFG)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(normalize_frames(stored, ds, CFG), expected)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_projection_window_matches_pydicom(function):
    ds = as_projection("MR_small.dcm", WindowCenter=[600, 100], WindowWidth=[500, 50])
    ds.VOILUTFunction = function
    stored = decode_frames(ds)
    got = normalize_frames(stored, ds, CFG)
    # pydicom maps the window to the signed 16-bit range; ours is [0, 1].
    low, high = -(2**15), 2**15 - 1
    expected = (apply_windowing(stored[0], ds, index=0) - low) / (high - low)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    assert got.min() < 0.05 and got.max() > 0.95  # the window really saturates this image


def test_projection_voi_lut_sequence():
    ds = read("vlut_04.dcm")
    ds.Modality = "CR"
    stored = decode_frames(ds)
    table = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    expected = (apply_voi(stored[0], ds) - table.min()) / (table.max() - table.min())
    np.testing.assert_allclose(normalize_frames(stored, ds, CFG)[0], expected, atol=1e-6)


def percentile_scaled(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, CFG.percentiles)
    return np.clip((values - lo) / (hi - lo), 0, 1)


def test_projection_without_voi_uses_percentiles():
    ds = as_projection("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    stored = decode_frames(ds)
    np.testing.assert_allclose(
        normalize_frames(stored, ds, CFG), percentile_scaled(stored), atol=1e-6
    )


def test_mr_percentiles_are_per_object():
    ds = read("emri_small.dcm")
    stored = decode_frames(ds).astype(np.float64)
    got = normalize_frames(stored.astype(np.uint16), ds, CFG)
    np.testing.assert_allclose(got, percentile_scaled(stored), atol=1e-6)
    # One scale for the whole object: a frame is not stretched on its own.
    assert not np.allclose(got[0], percentile_scaled(stored[0]), atol=1e-3)


def test_series_pools_percentiles_across_instances():
    ds = read("MR_small.dcm")
    frame = decode_frames(ds)
    dim, bright = np.clip(frame, 0, None), np.clip(frame, 0, None) * 2
    got = normalize_series([(dim, ds), (bright, ds)], CFG)
    assert got.shape == (2, 64, 64)
    np.testing.assert_allclose(got, percentile_scaled(np.concatenate([dim, bright])), atol=1e-6)
    # Alone, each instance would be stretched to the same image.
    np.testing.assert_allclose(
        normalize_frames(dim, ds, CFG), normalize_frames(bright, ds, CFG), atol=1e-6
    )
    assert got[1].mean() > got[0].mean() + 0.05


def test_constant_image_is_zeros():
    ds = read("MR_small.dcm")
    constant = np.full((2, 8, 8), 300, dtype=np.int16)
    with np.errstate(all="raise"):
        out = normalize_frames(constant, ds, CFG)
    np.testing.assert_array_equal(out, 0.0)


def test_rgb_to_luma():
    ds = read("SC_rgb.dcm")
    rgb = decode_frames(ds)
    np.testing.assert_allclose(normalize_frames(rgb, ds, CFG), (rgb @ LUMA) / 255, atol=1e-5)


def test_palette_colour_to_luma():
    ds = read("OBXXXX1A.dcm")
    indices = decode_frames(ds)
    assert indices.ndim == 3  # palette indices, like pydicom's pixel_array
    assert ds.RedPaletteColorLookupTableDescriptor[2] == 16  # 16-bit palette entries
    expected = (apply_color_lut(indices, ds)[..., :3] @ LUMA) / 65535
    np.testing.assert_allclose(normalize_frames(indices, ds, CFG), expected, atol=1e-5)


def test_16_bit_colour_uses_percentiles():
    ds = read("SC_rgb_16bit.dcm")
    rgb = decode_frames(ds)
    np.testing.assert_allclose(
        normalize_frames(rgb, ds, CFG), percentile_scaled(rgb @ LUMA), atol=1e-5
    )


def test_grey_ultrasound_8_bit_is_divided_by_255():
    ds = read("JPGLosslessP14SV1_1s_1f_8b.dcm")
    stored = decode_frames(ds)
    np.testing.assert_allclose(normalize_frames(stored, ds, CFG), stored / 255, atol=1e-6)


def test_multiframe_colour_ultrasound():
    ds = read("color3d_jpeg_baseline.dcm")
    out = normalized_frames(ds, [0, 60], CFG)
    assert out.shape == (2, 480, 640) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01


# --------------------------------------------------------------------------------------------
# Resizing, quantisation and the whole pipeline


def test_stretch_resizes_to_size():
    img = np.random.default_rng(0).random((30, 70), dtype=np.float32)
    out = resize_image(img, (64, 32), "stretch")
    assert out.shape == (64, 32) and out.dtype == np.float32


def test_downscaling_is_antialiased():
    checkerboard = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    out = resize_image(checkerboard, (32, 32), "stretch")
    np.testing.assert_allclose(out, 0.5, atol=0.01)  # no aliasing into stripes


def test_upscaling_a_ramp_stays_a_ramp():
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    out = resize_image(ramp, (64, 64), "stretch")
    assert np.all(np.diff(out, axis=1) >= -1e-6)
    np.testing.assert_allclose(out[:, 32], out[0, 32])  # rows stay identical
    assert 0 <= out.min() and out.max() <= 1


def test_letterbox_keeps_aspect_and_pads_with_zero():
    wide = np.ones((50, 100), dtype=np.float32)
    out = resize_image(wide, (64, 64), "letterbox")
    assert out.shape == (64, 64)
    filled_rows = np.flatnonzero(out.max(axis=1) > 0)
    assert (filled_rows[0], filled_rows[-1]) == (16, 47)
    np.testing.assert_allclose(out[16:48], 1.0)


def test_letterbox_uses_pixel_spacing():
    # 100 x 100 pixels, rows 2 mm apart, columns 1 mm apart: 200 mm tall, 100 mm wide.
    img = np.ones((100, 100), dtype=np.float32)
    out = resize_image(img, (64, 64), "letterbox", pixel_spacing=(2.0, 1.0))
    filled_cols = np.flatnonzero(out.max(axis=0) > 0)
    assert (filled_cols[0], filled_cols[-1]) == (16, 47)
    assert np.all(out.max(axis=1) > 0)  # full height
    # Without the spacing the square image fills the square output.
    assert np.all(resize_image(img, (64, 64), "letterbox") == 1.0)


def test_resize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="letterbox or stretch"):
        resize_image(np.zeros((4, 4)), (2, 2), "crop")


def test_quantize():
    values = np.array([-0.1, 0.0, 0.5, 1.0, 1.2, np.nan])
    np.testing.assert_array_equal(quantize(values, "uint8"), [0, 0, 128, 255, 255, 0])
    assert quantize(values, "uint8").dtype == np.uint8
    np.testing.assert_array_equal(quantize(values, "uint16"), [0, 0, 32768, 65535, 65535, 0])
    with pytest.raises(ValueError):
        quantize(values, "float16")


def test_preprocess_frames_ct():
    ds = read("CT_small.dcm")
    out = preprocess_frames(ds, None, CFG)
    assert out.shape == (1, *CFG.image_size) and out.dtype == np.uint8
    expected = quantize(
        resize_image(normalized_frames(ds, None, CFG)[0], CFG.image_size, "letterbox"), "uint8"
    )
    np.testing.assert_array_equal(out[0], expected)


def test_preprocess_frames_selected_frames_uint16():
    ds = read("emri_small.dcm")
    cfg = PreprocessConfig(image_size=(32, 48), dtype="uint16", resize="stretch")
    out = preprocess_frames(ds, [0, 5], cfg)
    assert out.shape == (2, 32, 48) and out.dtype == np.uint16
    assert out.max() > 60000 and not np.array_equal(out[0], out[1])


def test_preprocess_frames_letterboxes_tall_image():
    ds = read("JPEG-LL.dcm")  # 1024 x 256, no pixel spacing: square pixels
    out = preprocess_frames(ds, None, PreprocessConfig(image_size=(64, 64)))
    assert out.shape == (1, 64, 64)
    assert np.all(out[0, :, :24] == 0) and np.all(out[0, :, 40:] == 0)
    assert out[0, :, 24:40].max() > 0


# --------------------------------------------------------------------------------------------
# Geometry


def test_classic_geometry_from_header_only():
    ds = read("CT_small.dcm", stop_before_pixels=True)
    (geom,) = frame_geometry(ds)
    assert geom.position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert geom.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert geom.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert geom.slice_thickness == float(ds.SliceThickness)
    assert (geom.rows, geom.cols) == (128, 128)


def test_geometry_round_trips_json_and_pickle():
    (geom,) = frame_geometry(read("CT_small.dcm", stop_before_pixels=True))
    assert FrameGeometry.from_json(json.loads(json.dumps(geom.to_json()))) == geom
    assert pickle.loads(pickle.dumps(geom)) == geom
    empty = FrameGeometry(None, None, None, 0, 0)
    assert FrameGeometry.from_json(json.loads(json.dumps(empty.to_json()))) == empty


def test_enhanced_geometry_from_functional_groups():
    ds = read("eCT_Supplemental.dcm", stop_before_pixels=True)
    geoms = frame_geometry(ds)
    assert len(geoms) == 2
    for geom, frame in zip(geoms, ds.PerFrameFunctionalGroupsSequence, strict=True):
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert geom.position == tuple(float(v) for v in position)
        assert geom.orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        assert geom.pixel_spacing == (0.388672, 0.388672)
        assert geom.slice_thickness == 10.0
    assert geoms[0].position != geoms[1].position


def item(**attributes) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_enhanced_geometry_per_frame_overrides_shared_and_tolerates_gaps():
    ds = item(Rows=4, Columns=6, NumberOfFrames=3)
    ds.SharedFunctionalGroupsSequence = [
        item(
            PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
            PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.7], SliceThickness=2)],
        )
    ]
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence=[item(ImagePositionPatient=[0, 0, 0])]),
        item(
            PlanePositionSequence=[item(ImagePositionPatient=[0, 0, 2])],
            PlaneOrientationSequence=[item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])],
        ),
        item(),  # a frame whose position is missing
    ]
    first, second, third = frame_geometry(ds)
    assert first == FrameGeometry((0, 0, 0), (1, 0, 0, 0, 1, 0), (0.5, 0.7), 4, 6, 2.0)
    assert second.position == (0, 0, 2) and second.orientation == (0, 1, 0, 0, 0, -1)
    assert third.position is None and third.pixel_spacing == (0.5, 0.7)


def test_malformed_geometry_becomes_none():
    ds = read("CT_small.dcm", stop_before_pixels=True)
    ds.ImagePositionPatient = [1, 2]  # wrong count
    ds.PixelSpacing = [0, 0]  # not a spacing
    raw = b"abc\\1\\0\\0\\1\\0 "  # non-numeric, as a file might hold it
    tag = Tag("ImageOrientationPatient")
    ds._dict[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
    ds.SliceThickness = None
    (geom,) = frame_geometry(ds)
    assert geom == FrameGeometry(None, None, None, 128, 128, None)


def test_projection_uses_imager_pixel_spacing():
    ds = read("MR_small.dcm", stop_before_pixels=True)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.2]
    assert frame_geometry(ds)[0].pixel_spacing == (0.15, 0.2)


def test_grid_frame_offsets_place_frames_along_the_normal():
    ds = read("rtdose.dcm", stop_before_pixels=True)
    geoms = frame_geometry(ds)
    assert len(geoms) == int(ds.NumberOfFrames)
    origin = np.array(ds.ImagePositionPatient, dtype=float)
    normal = np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
    offsets = np.array(ds.GridFrameOffsetVector, dtype=float)
    for geom, offset in zip(geoms, offsets, strict=True):
        np.testing.assert_allclose(geom.position, origin + (offset - offsets[0]) * normal)


def test_cine_frames_share_one_geometry():
    geoms = frame_geometry(read("emri_small.dcm", stop_before_pixels=True))
    assert len(geoms) == 10 and len(set(geoms)) == 1


# ------------------------------------------------------------- DS values from their raw bytes
# frame_geometry and the window reader take plain DS text from the raw bytes (pixels.
# _raw_ds_items); with that switched off, pydicom converts every value. Both must agree.


def test_geometry_from_raw_ds_equals_pydicom_on_every_test_file(monkeypatch):
    import warnings

    from pydicom.data import get_testdata_files

    def read(path):
        return pydicom.dcmread(path, defer_size=4096, force=True)

    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files()):
            try:
                read(path)
            except Exception:
                continue
            fast = [g.to_json() for g in pixels.frame_geometry(read(path))]
            fast_window = pixels._window(read(path), 0)
            with monkeypatch.context() as m:
                m.setattr(pixels, "_raw_ds_items", lambda *args: None)
                slow = [g.to_json() for g in pixels.frame_geometry(read(path))]
                slow_window = pixels._window(read(path), 0)
            assert fast == slow and fast_window == slow_window, path
            checked += 1
    assert checked > 100


def test_raw_ds_numbers_equal_pydicom_on_random_text(monkeypatch):
    import random
    import warnings

    pieces = ["1", "2.5", "-.5", "+3", "1e3", "4E-2", "7.", ".", "e", "-", "+", " ", "\\", "0",
              "12345678901234567", "1e999", "--1", "5e"]  # fmt: skip
    rng = random.Random(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(1500):
            text = "".join(rng.choices(pieces, k=rng.randrange(6))).encode()

            def ds(text=text):
                out = Dataset()
                for keyword in ("PixelSpacing", "WindowCenter"):
                    tag = pydicom.datadict.tag_for_keyword(keyword)
                    out[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)
                return out

            fast = (
                pixels._floats(ds(), "PixelSpacing", 2),
                pixels._first_float(ds(), "WindowCenter"),
            )
            with monkeypatch.context() as m:
                m.setattr(pixels, "_raw_ds_items", lambda *args: None)
                slow = (
                    pixels._floats(ds(), "PixelSpacing", 2),
                    pixels._first_float(ds(), "WindowCenter"),
                )
            assert fast == slow, text
