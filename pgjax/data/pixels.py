"""Pixels of a DICOM object: decode frames, normalise them to [0, 1], resize, quantise.

Also reads the per-frame geometry (position, orientation, spacing) that volume assembly needs.

Runs in spawned preprocessing workers, so it imports numpy, pydicom and Pillow only (no jax).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from pgjax.data.config import DEFAULT_MAX_PIXELS, PreprocessConfig

# Projection radiography: the stored values have no calibrated unit, but the header usually
# carries the VOI (window or LUT) the modality chose for display, which we trust over statistics.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "PX", "IO"})

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# ITU-R BT.601 luma weights for R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Percentiles are estimated on at most this many values (a strided sample), so a 300-slice
# volume costs a ~1M-element partial sort instead of an 80M one.
_PERCENTILE_SAMPLE = 1 << 20
# PackBits (RLE Lossless) encodes a run of 128 equal bytes in 2: no segment expands further.
_RLE_MAX_RATIO = 64


class PixelError(ValueError):
    """Pixel data that cannot be decoded; the message is a short reason without the file name."""


# --------------------------------------------------------------------------------------------
# Decoding


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames of `ds` (1 when absent, empty or malformed)."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(n, 1)


def decode_frames(
    ds: Dataset, frames: Sequence[int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode the stored pixel values of the selected frames of `ds` (None: all frames).

    Returns [F, rows, cols] for single-sample data or [F, rows, cols, 3] RGB for colour data;
    pydicom converts YBR_FULL/YBR_FULL_422 to RGB, JPEG 2000 decoders undo YBR_ICT/YBR_RCT.
    PALETTE COLOR objects come back as palette indices [F, rows, cols], like pydicom's
    pixel_array; `normalize_frames` applies the palette. Selected frames are decoded one by
    one (pydicom reads only that frame's bytes or fragments), so asking for one frame of a
    long cine does not decode the rest. Raises PixelError with the reason on failure, and
    before decoding when the declared size is over `max_pixels` or not backed by the data
    (`size_problem`).
    """
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise PixelError("no pixel data")
    tsyntax = _transfer_syntax(ds)
    decoder = _decoder_for(tsyntax)
    n = number_of_frames(ds)
    value = ds[next(k for k in _PIXEL_KEYWORDS if k in ds)].value
    if isinstance(value, bytes | bytearray):
        problem = size_problem(ds, max_pixels, io.BytesIO(value), len(value))
        if problem:
            raise PixelError(problem)
    if frames is None:
        stack = _decode(decoder, ds, None)
        return stack[None] if n == 1 else stack
    frames = [int(i) for i in frames]
    if not frames:
        raise ValueError("no frames requested")
    for i in frames:
        if not 0 <= i < n:
            raise PixelError(f"frame {i} out of range: the object has {n} frame(s)")
    return np.stack([_decode(decoder, ds, i) for i in frames])


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax:
        return UID(tsyntax)
    # A file without a meta header: pydicom still knows how it read the data set.
    encoding = getattr(ds, "original_encoding", (None, None))
    native = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }
    if encoding in native:
        return native[encoding]
    raise PixelError("no transfer syntax: the file meta has no TransferSyntaxUID")


def _decoder_for(tsyntax: UID) -> Decoder:
    name = tsyntax.name if tsyntax.name != str(tsyntax) else "unknown"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise PixelError(
            f"unsupported transfer syntax {tsyntax} ({name}): pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise PixelError(f"unsupported transfer syntax {tsyntax} ({name}): install {missing}")
    return decoder


def size_problem(ds: Dataset, max_pixels: int, data: BinaryIO, length: int) -> str | None:
    """Why the declared image size of `ds` must not be decoded, or None; checked before any
    pixel buffer is allocated, because a decoder allocates what the header declares.

    data: the pixel data element's value, positioned at its first byte (read for encapsulated
    data only); length: the bytes available from there. Problems: one frame's declared rows x
    columns x samples over `max_pixels`; native data shorter than rows x columns x samples x
    frames x bits; encapsulated data with fewer fragments than frames (a fragment holds at
    most one frame), or RLE data too short for the declared size even at RLE's best
    compression. The scan runs it on the file, the pixel phase on the value read.
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # the decoder names the missing or malformed element more precisely
    if rows * cols * samples > max_pixels:
        return (
            f"image too large: {rows} x {cols} pixels x {samples} samples per frame, over "
            f"max_pixels={max_pixels}"
        )
    frames = number_of_frames(ds)
    tsyntax = _transfer_syntax(ds)
    if not tsyntax.is_encapsulated:
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422" and samples == 3:
            samples = 2  # two chroma values shared by each pair of pixels
        expected = math.ceil(rows * cols * samples * frames * bits / 8)
        if length < expected:
            return f"truncated pixel data: expected {expected} bytes, found {length}"
        return None
    fragments, fragment_bytes = encapsulated_extent(data, length)
    if fragments < frames:
        return (
            f"truncated pixel data: fewer compressed fragments than frames ({fragments} "
            f"fragments, {frames} frames declared)"
        )
    # PackBits, RLE's scheme, turns 2 bytes into at most 128: one byte plane per segment.
    most = fragment_bytes * _RLE_MAX_RATIO
    if tsyntax == RLELossless and most < rows * cols * samples * frames * math.ceil(bits / 8):
        return (
            f"truncated pixel data: {fragment_bytes} bytes of RLE data cannot hold "
            f"{frames} frame(s) of {rows} x {cols} x {samples}"
        )
    return None


def encapsulated_extent(data: BinaryIO, length: int) -> tuple[int, int]:
    """(fragments, their total bytes) of an encapsulated pixel data value read from `data`
    (positioned at the Basic Offset Table item; at most `length` bytes). Reads the 8-byte item
    headers only; stops at the sequence delimiter, at anything that is not an item, or at the
    end of the data (a fragment cut short counts the bytes present)."""
    fragments = total = 0
    start = data.tell()
    offset_table = True
    while True:
        pos = data.tell() - start
        head = data.read(8) if pos + 8 <= length else b""
        if len(head) < 8:
            break
        group, element, size = struct.unpack("<HHI", head)
        if (group, element) != (0xFFFE, 0xE000):  # the delimiter (FFFE,E0DD) or garbage
            break
        if not offset_table:
            fragments += 1
            total += max(0, min(size, length - pos - 8))
        offset_table = False
        data.seek(size, io.SEEK_CUR)
    return fragments, total


def _decode(decoder: Decoder, ds: Dataset, index: int | None) -> np.ndarray:
    try:
        arr, props = decoder.as_array(ds, index=index, validate=True, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as err:  # decoding plugins raise whatever they like; give one reason
        raise PixelError(_reason(err)) from err
    # pydicom converts YBR_FULL(_422) to RGB itself unless a plugin reports it did not.
    photometric = str(props.get("photometric_interpretation", ""))
    if arr.shape[-1:] == (3,) and photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    # Big endian objects decode to big endian arrays; give callers native ones.
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _reason(err: Exception) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    if "fewer fragments than frames" in message:
        return "truncated pixel data: fewer compressed fragments than frames"
    if len(message) > 300:
        message = message[:297] + "..."
    return f"cannot decode: {message}"


# --------------------------------------------------------------------------------------------
# Normalisation


def modality_values(
    frames: np.ndarray, ds: Dataset, indices: Sequence[int] | None = None
) -> np.ndarray:
    """Stored values -> modality values (Hounsfield units for CT) as float32.

    Applies the Modality LUT or RescaleSlope/RescaleIntercept. For enhanced multi-frame objects
    the rescale sits in the per-frame or shared Pixel Value Transformation functional group;
    `indices` are the frame numbers of `frames` within `ds` (None: 0..F-1) to look it up.
    """
    frames = np.asarray(frames)
    indices = _frame_indices(indices, len(frames))
    sources = [_group_item(ds, i, "PixelValueTransformationSequence") or ds for i in indices]
    try:
        if all(source is sources[0] for source in sources):
            return np.asarray(apply_modality_lut(frames, sources[0]), dtype=np.float32)
        return np.stack(
            [
                np.asarray(apply_modality_lut(frame, source), dtype=np.float32)
                for frame, source in zip(frames, sources, strict=True)
            ]
        )
    except (AttributeError, KeyError, TypeError, ValueError, NotImplementedError) as err:
        raise PixelError(f"invalid modality LUT or rescale: {err}") from err


def normalize_frames(
    frames: np.ndarray,
    ds: Dataset,
    cfg: PreprocessConfig,
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Decoded frames -> float32 [F, rows, cols] in [0, 1], by modality.

    - Colour (RGB, converted YBR) and US: BT.601 luma, /255 for 8-bit data, otherwise
      percentiles. PALETTE COLOR: the palette, then luma over the palette's 8 or 16-bit scale.
    - CT: Hounsfield units through the window cfg.ct_window (center, width).
    - Projection radiography (CR, DX, MG, RF, XA, PX, IO): modality LUT, then the header's
      VOI LUT or first window; percentiles when the header has neither.
    - MR and everything else: modality LUT, then robust percentile scaling (cfg.percentiles).
      Percentiles are taken over all frames passed in together (per object, not per frame),
      so the frames of one multi-frame volume keep their relative contrast.
    MONOCHROME1 is inverted so every image reads like MONOCHROME2 (bone bright on radiographs),
    except for CT, where the Hounsfield window already makes bone bright. Constant images come
    out as zeros.
    `indices` are the frame numbers of `frames` within `ds`, for per-frame functional groups.
    """
    return normalize_series([(frames, ds, indices)], cfg)


def normalize_series(
    parts: Sequence[tuple[Any, ...]],
    cfg: PreprocessConfig,
) -> np.ndarray:
    """Normalise the frames of several objects as one: float32 [sum of F, rows, cols].

    `parts` are (frames, ds) or (frames, ds, indices) for each object, e.g. the single-frame
    instances of one classic MR series in slice order. Same rules as `normalize_frames`, but
    percentile statistics are pooled over all parts, so slices of a volume share one scale
    instead of each slice being stretched on its own. All frames must have the same size.
    """
    return normalize_prepared(
        [prepare_part(part[0], part[1], cfg, part[2] if len(part) > 2 else None) for part in parts],
        cfg,
    )


def prepare_part(
    frames: np.ndarray, ds: Dataset, cfg: PreprocessConfig, indices: Sequence[int] | None = None
) -> tuple[np.ndarray, bool, bool]:
    """One object's share of `normalize_series`: (values, needs_scaling, invert). Values that
    need no scaling are final (before inversion) and the same frame by frame as for any stack
    of frames they are part of: every step before the percentiles works value by value."""
    frames = _as_frame_stack(frames)
    values, needs_scaling = _values01_or_raw(frames, ds, cfg, indices)
    return values, needs_scaling, _is_monochrome1(ds) and not _is_ct(ds, frames)


def normalize_prepared(
    prepared: Sequence[tuple[np.ndarray, bool, bool]], cfg: PreprocessConfig
) -> np.ndarray:
    """`normalize_series` after `prepare_part` on each part."""
    if not prepared:
        raise ValueError("nothing to normalise")
    raw = [values for values, needs_scaling, _ in prepared if needs_scaling]
    bounds = _percentile_bounds(raw, cfg.percentiles) if raw else None
    out = []
    for values, needs_scaling, invert in prepared:
        if needs_scaling:
            values = _scale(values, bounds)
        out.append(1.0 - values if invert else values)
    return np.concatenate(out).astype(np.float32, copy=False)


def _values01_or_raw(
    frames: np.ndarray, ds: Dataset, cfg: PreprocessConfig, indices: Sequence[int] | None
) -> tuple[np.ndarray, bool]:
    """(values, needs_scaling): values already in [0, 1], or raw values for percentile scaling."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    modality = _modality(ds)
    if photometric == "PALETTE COLOR" and frames.ndim == 3:
        try:
            rgb = apply_color_lut(frames, ds)[..., :3]  # drop alpha if any
        except Exception as err:
            raise PixelError(f"cannot apply the palette colour LUT: {err}") from err
        # The palette's entries are 8 or 16 bit by definition: that is the full scale.
        full_scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
        return (rgb.astype(np.float32) @ _LUMA) / full_scale, False
    if frames.ndim == 4:
        return _display_grey(frames)
    if modality == "US":
        return _display_grey(frames)
    values = _finite(modality_values(frames, ds, indices))
    if modality == "CT":
        center, width = cfg.ct_window
        return _window_linear_exact(values, center, width), False
    if modality in PROJECTION_MODALITIES:
        windowed = _apply_header_voi(values, ds, _frame_indices(indices, len(values)))
        if windowed is not None:
            return windowed, False
    return values, True


def _finite(values: np.ndarray) -> np.ndarray:
    """np.nan_to_num(values), skipped when every value is finite (nearly always; it is slow)."""
    return values if np.isfinite(values).all() else np.nan_to_num(values)


def _display_grey(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    """Display-referred data (colour, ultrasound): luma, /255 when it is 8-bit."""
    eight_bit = frames.dtype == np.uint8
    grey = frames.astype(np.float32)
    if grey.ndim == 4:
        grey = grey @ _LUMA
    if eight_bit:
        return grey / 255.0, False
    return _finite(grey), True


def _apply_header_voi(values: np.ndarray, ds: Dataset, indices: Sequence[int]) -> np.ndarray | None:
    """The header's VOI LUT (preferred, as pydicom does) or window, mapped to [0, 1]."""
    if ds.get("VOILUTSequence"):
        try:
            item = ds.VOILUTSequence[0]
            n_entries = int(item.LUTDescriptor[0]) or 1 << 16
            first = int(item.LUTDescriptor[1])
            # Passing every input the LUT maps yields its table, hence its output range.
            table = apply_voi(np.arange(first, first + n_entries), ds).astype(np.float32)
            lo, hi = float(table.min()), float(table.max())
            mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float32)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, NotImplementedError):
            mapped = None  # a broken LUT: fall back to the window or percentiles
        if mapped is not None and hi > lo:
            return (mapped - lo) / (hi - lo)
    windows = [_window(ds, i) for i in indices]
    if any(w is None for w in windows):
        return None
    return np.stack(
        [_apply_window(frame, *window) for frame, window in zip(values, windows, strict=True)]
    )


def _window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """(center, width, function) of frame `index`: functional groups first, then top level."""
    source = _group_item(ds, index, "FrameVOILUTSequence") or ds
    center = _first_float(source, "WindowCenter")
    width = _first_float(source, "WindowWidth")
    if center is None or width is None or width <= 0:
        return None
    function = str(source.get("VOILUTFunction") or ds.get("VOILUTFunction") or "LINEAR")
    return center, width, function.strip().upper()


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI functions, with the output range mapped to [0, 1]."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: 0
            return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT" or width <= 1:
        return _window_linear_exact(values, center, width)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0).astype(np.float32)


def _window_linear_exact(values: np.ndarray, center: float, width: float) -> np.ndarray:
    # center - width/2 -> 0, center + width/2 -> 1, so the center itself maps to 0.5.
    return np.clip((values - center) / width + 0.5, 0.0, 1.0).astype(np.float32)


def _percentile_bounds(
    arrays: Sequence[np.ndarray], percentiles: tuple[float, float]
) -> tuple[float, float]:
    total = sum(a.size for a in arrays)
    step = max(1, math.ceil(total / _PERCENTILE_SAMPLE))
    sample = np.concatenate([a.ravel()[::step] for a in arrays])
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:  # e.g. > 99.5% background: fall back to the full range
        lo = min(float(a.min()) for a in arrays)
        hi = max(float(a.max()) for a in arrays)
    return lo, hi


def _scale(values: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)  # constant image
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _modality(ds: Dataset) -> str:
    return str(ds.get("Modality") or "").strip().upper()


def _is_ct(ds: Dataset, frames: np.ndarray) -> bool:
    return _modality(ds) == "CT" and frames.ndim == 3


def _is_monochrome1(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def _as_frame_stack(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim not in (3, 4):
        raise ValueError(f"expected [F, rows, cols] or [F, rows, cols, 3], got {frames.shape}")
    return frames


def _frame_indices(indices: Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    indices = [int(i) for i in indices]
    if len(indices) != n:
        raise ValueError(f"{len(indices)} frame indices for {n} frames")
    return indices


# --------------------------------------------------------------------------------------------
# Resizing and quantisation


def fitted_size(
    shape: tuple[int, int],
    size: tuple[int, int],
    pixel_spacing: tuple[float, float] | None = None,
) -> tuple[int, int]:
    """(rows, cols) of an image of `shape` letterboxed into `size`, keeping its physical aspect.

    `pixel_spacing` is (row_mm, col_mm), the distance between rows and between columns; without
    it (or with an invalid one) pixels are taken to be square.
    """
    rows, cols = shape
    row_mm, col_mm = _valid_spacing(pixel_spacing) or (1.0, 1.0)
    height_mm, width_mm = rows * row_mm, cols * col_mm
    scale = min(size[0] / height_mm, size[1] / width_mm)
    out_rows = min(size[0], max(1, round(height_mm * scale)))
    out_cols = min(size[1], max(1, round(width_mm * scale)))
    return out_rows, out_cols


def resize_image(
    img: np.ndarray,
    size: tuple[int, int],
    mode: str,
    pixel_spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """Resize a 2D image to float32 (rows, cols) = `size`.

    Bilinear in Pillow's float mode, which widens the filter when shrinking, so downscaling is
    antialiased. "letterbox" keeps the physical aspect ratio (from `pixel_spacing`, (row_mm,
    col_mm), when given), centres the image and pads with 0; "stretch" ignores the aspect.
    """
    img = np.ascontiguousarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {img.shape}")
    size = (int(size[0]), int(size[1]))
    if mode == "stretch":
        return _resize(img, size)
    if mode != "letterbox":
        raise ValueError(f"resize mode must be letterbox or stretch, not {mode!r}")
    rows, cols = fitted_size(img.shape, size, pixel_spacing)
    out = np.zeros(size, dtype=np.float32)
    top, left = (size[0] - rows) // 2, (size[1] - cols) // 2
    out[top : top + rows, left : left + cols] = _resize(img, (rows, cols))
    return out


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if img.shape == size:
        return img.copy()
    resized = Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.float32)


def quantize(img01: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] floats -> uint8 (x255) or uint16 (x65535), clipped and rounded; NaN becomes 0."""
    scales = {"uint8": 255.0, "uint16": 65535.0}
    if dtype not in scales:
        raise ValueError(f"dtype must be uint8 or uint16, not {dtype!r}")
    # fmax/fmin skip NaN (NaN -> 0) and clip +-inf to 1/0: np.clip(np.nan_to_num(x), 0, 1)
    # in two passes instead of six.
    img = np.fmax(np.asarray(img01, dtype=np.float32), 0.0)  # a new array: the rest in place
    np.fmin(img, 1.0, out=img)
    img *= scales[dtype]
    return np.rint(img, out=img).astype(dtype)


# --------------------------------------------------------------------------------------------
# The whole per-object pipeline


def normalized_frames(
    ds: Dataset, frames: Sequence[int] | None, cfg: PreprocessConfig
) -> np.ndarray:
    """Decode and normalise the selected frames (None: all): float32 [F, rows, cols] in [0, 1]."""
    pixels = decode_frames(ds, frames, cfg.max_pixels)
    return normalize_frames(pixels, ds, cfg, indices=frames)


def preprocess_frames(
    ds: Dataset, frames: Sequence[int] | None, cfg: PreprocessConfig
) -> np.ndarray:
    """Decode, normalise, resize to cfg.image_size and quantise: [F, H, W] of cfg.dtype.

    Resizing uses each frame's pixel spacing, so letterboxing keeps the physical aspect.
    """
    return images_from_frames(decode_frames(ds, frames, cfg.max_pixels), ds, frames, cfg)


def images_from_frames(
    pixels: np.ndarray, ds: Dataset, frames: Sequence[int] | None, cfg: PreprocessConfig
) -> np.ndarray:
    """`preprocess_frames` after decoding: `pixels` are decode_frames(ds, frames)."""
    return images_from_normalized(
        normalize_frames(pixels, ds, cfg, indices=frames), ds, frames, cfg
    )


def images_from_normalized(
    images: np.ndarray, ds: Dataset, frames: Sequence[int] | None, cfg: PreprocessConfig
) -> np.ndarray:
    """`images_from_frames` after normalising: resize and quantise [F, rows, cols] in [0, 1]."""
    indices = list(range(len(images))) if frames is None else [int(i) for i in frames]
    geometry = frame_geometry(ds)
    out = np.empty((len(images), *cfg.image_size), dtype=cfg.dtype)
    for k, (image, index) in enumerate(zip(images, indices, strict=True)):
        spacing = geometry[index].pixel_spacing
        out[k] = quantize(resize_image(image, cfg.image_size, cfg.resize, spacing), cfg.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies in the patient coordinate system (mm); None where unknown.

    orientation holds the row direction cosines then the column direction cosines;
    pixel_spacing is (row_mm, col_mm): between adjacent rows, then adjacent columns.
    rows/cols are 0 when the header lacks them.
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    cols: int
    slice_thickness: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A plain dict of lists, numbers and None."""
        return {
            "position": _list_or_none(self.position),
            "orientation": _list_or_none(self.orientation),
            "pixel_spacing": _list_or_none(self.pixel_spacing),
            "rows": self.rows,
            "cols": self.cols,
            "slice_thickness": self.slice_thickness,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FrameGeometry:
        """Inverse of `to_json`."""
        return cls(
            position=_tuple_or_none(obj.get("position")),
            orientation=_tuple_or_none(obj.get("orientation")),
            pixel_spacing=_tuple_or_none(obj.get("pixel_spacing")),
            rows=int(obj["rows"]),
            cols=int(obj["cols"]),
            slice_thickness=obj.get("slice_thickness"),
        )


def frame_geometry(ds: Dataset) -> list[FrameGeometry]:
    """One FrameGeometry per frame of `ds`, from the header alone (stop_before_pixels is fine).

    Enhanced multi-frame objects: plane position, plane orientation and pixel measures from the
    per-frame functional groups, else the shared ones, else the top level. Classic objects:
    ImagePositionPatient, ImageOrientationPatient, PixelSpacing (ImagerPixelSpacing for
    projection radiography), SliceThickness; with a GridFrameOffsetVector the frames are offset
    along the slice normal, otherwise every frame shares the position (e.g. a cine loop).
    Missing or malformed values become None; this never raises for a bad header.
    """
    n = number_of_frames(ds)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _spacing(ds)
    thickness = _positive_float(ds, "SliceThickness")

    if _sequence(ds, "PerFrameFunctionalGroupsSequence") or _sequence(
        ds, "SharedFunctionalGroupsSequence"
    ):
        geometries = []
        for i in range(n):
            plane = _group_item(ds, i, "PlanePositionSequence")
            plane_orientation = _group_item(ds, i, "PlaneOrientationSequence")
            measures = _group_item(ds, i, "PixelMeasuresSequence")
            geometries.append(
                FrameGeometry(
                    position=_floats(plane, "ImagePositionPatient", 3) or position,
                    orientation=_floats(plane_orientation, "ImageOrientationPatient", 6)
                    or orientation,
                    pixel_spacing=_spacing(measures) or spacing,
                    rows=rows,
                    cols=cols,
                    slice_thickness=_positive_float(measures, "SliceThickness") or thickness,
                )
            )
        return geometries

    positions = [position] * n
    offsets = _floats(ds, "GridFrameOffsetVector", n) if n > 1 else None
    if offsets is not None and position is not None and orientation is not None:
        normal = np.cross(orientation[:3], orientation[3:])
        # Offsets are relative to the first frame whether the vector starts at 0 (relative)
        # or at the first frame's z (absolute, axial only).
        positions = [
            tuple(float(v) for v in np.asarray(position) + (offset - offsets[0]) * normal)
            for offset in offsets
        ]
    return [
        FrameGeometry(
            position=p,
            orientation=orientation,
            pixel_spacing=spacing,
            rows=rows,
            cols=cols,
            slice_thickness=thickness,
        )
        for p in positions
    ]


def _group_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of `keyword` in frame `index`'s functional group, else the shared group."""
    per_frame = _sequence(ds, "PerFrameFunctionalGroupsSequence")
    shared = _sequence(ds, "SharedFunctionalGroupsSequence")
    for groups in (per_frame[index : index + 1], shared[:1]):
        for group in groups:
            items = _sequence(group, keyword)
            if items:
                return items[0]
    return None


def _sequence(ds: Dataset, keyword: str) -> list:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not break a header scan
        return []
    return list(value) if value else []


def _spacing(ds: Dataset | None) -> tuple[float, float] | None:
    spacing = _floats(ds, "PixelSpacing", 2) or _floats(ds, "ImagerPixelSpacing", 2)
    return _valid_spacing(spacing)


def _valid_spacing(spacing: Sequence[float] | None) -> tuple[float, float] | None:
    if spacing is None or len(spacing) != 2:
        return None
    row_mm, col_mm = (float(v) for v in spacing)
    if not (row_mm > 0 and col_mm > 0 and math.isfinite(row_mm) and math.isfinite(col_mm)):
        return None
    return row_mm, col_mm


# Geometry and windows are DS values. pydicom's conversion of one costs ~40 us, and ends, for
# every outcome the readers below act on, in float() of each backslash-separated component
# (DSfloat or, for a value it does not accept, the plain string); so for plain numeric text the
# components are taken from the raw bytes. tests/test_pixels.py compares both ways.
_DS_CHARS = frozenset("0123456789+-.eE\\ ")


def _raw_ds_items(ds: Dataset, keyword: str) -> list[str] | None:
    """A DS element's components straight from its raw bytes, or None: ask pydicom."""
    tag = _tag(keyword)
    elem = ds.get_item(tag, keep_deferred=True)
    if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes) or not elem.value:
        return None
    if (elem.VR or dictionary_VR(tag)) != "DS" or not elem.value.isascii():
        return None
    text = elem.value.decode("ascii")
    return text.split("\\") if _DS_CHARS.issuperset(text) else None


@functools.cache
def _tag(keyword: str) -> int:
    return tag_for_keyword(keyword)


def _floats(ds: Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    """Exactly `count` finite numbers from a multi-valued element, else None."""
    if ds is None:
        return None
    items = _raw_ds_items(ds, keyword)
    try:
        if items is not None:
            numbers = tuple(float(v) for v in items)
            return _finite_count(numbers, count)
        value = ds.get(keyword)
        if value is None or isinstance(value, bytes):
            return None
        values = [value] if isinstance(value, (str, int, float)) else list(value)
        numbers = tuple(float(v) for v in values)
    except Exception:  # non-numeric strings, odd VRs: "malformed" is all we need to know
        return None
    return _finite_count(numbers, count)


def _finite_count(numbers: tuple[float, ...], count: int) -> tuple[float, ...] | None:
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _first_float(ds: Dataset | None, keyword: str) -> float | None:
    """The first value of a possibly multi-valued numeric element (e.g. WindowCenter)."""
    if ds is None:
        return None
    items = _raw_ds_items(ds, keyword)
    try:
        value = items[0] if items is not None else ds.get(keyword)
        if value is None or value == "":
            return None
        if not isinstance(value, (str, int, float)):
            value = list(value)[0]
        number = float(value)
    except Exception:
        return None
    return number if math.isfinite(number) else None


def _positive_float(ds: Dataset | None, keyword: str) -> float | None:
    number = _first_float(ds, keyword)
    return number if number is not None and number > 0 else None


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _list_or_none(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _tuple_or_none(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)
