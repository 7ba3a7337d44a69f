"""Our JPEG lossless SV1 encoder (pgjax/synth/ljpeg.py): what it writes decodes, through pydicom
and its libjpeg plugin, to exactly the pixels given."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from pgjax.synth import ljpeg

pytest.importorskip("libjpeg")  # pylibjpeg-libjpeg: pydicom's decoder for this syntax


def _through_pydicom(frames: np.ndarray, bits: int) -> np.ndarray:
    """Encode each frame, wrap them in a DICOM object, save, read back with pydicom, decode."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.NumberOfFrames = len(frames)
    ds.add_new(0x7FE00010, "OB", encapsulate([ljpeg.encode(f, bits) for f in frames]))
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, force=True).pixel_array.reshape(frames.shape)


def _smooth(rows: int, cols: int, top: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    wave = (np.sin(x / 23.0) + np.cos(y / 17.0) + 2.0) / 4.0
    return np.rint(wave * top).astype(np.uint16)


def test_random_and_smooth_frames_decode_to_the_input():
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 1 << 16, (2, 45, 61), dtype=np.uint16), 16),  # every category
        (rng.integers(0, 1 << 12, (3, 64, 40), dtype=np.uint16), 12),
        (np.stack([_smooth(120, 90, 4095), _smooth(120, 90, 4095)[::-1]]), 12),
        (_smooth(77, 130, 65535)[None], 16),
    ]
    for frames, bits in cases:
        assert np.array_equal(_through_pydicom(frames, bits), frames), (frames.shape, bits)


def test_edge_values_and_the_difference_that_has_no_extra_bits():
    # 0 and 65535 side by side, constant frames, a 1x1 frame, and differences of +-32768
    # (modulo 2^16: category 16, no extra bits), which only 16-bit data has.
    edges = np.zeros((9, 11), dtype=np.uint16)
    edges[::2, ::3] = 65535
    half = np.array([[0, 32768, 0, 32768, 65535, 32767], [40000, 7232, 7232, 40000, 0, 1]])
    assert (np.abs(ljpeg._differences(half.astype(np.uint16), 16)) == 32768).sum() >= 5
    for frames, bits in [
        (edges[None], 16),
        (half.astype(np.uint16)[None], 16),
        (np.full((2, 5, 7), 65535, dtype=np.uint16), 16),
        (np.full((1, 5, 7), 4095, dtype=np.uint16), 12),
        (np.zeros((1, 1, 1), dtype=np.uint16), 12),
    ]:
        assert np.array_equal(_through_pydicom(frames, bits), frames), (frames.shape, bits)


def test_the_stream_says_process_14_selection_value_1_and_stuffs_ff_bytes():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 1 << 16, (64, 64), dtype=np.uint16)
    stream = ljpeg.encode(image, 16)
    assert stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
    assert stream[2:4] == b"\xff\xc3"  # SOF3: lossless, Huffman
    sos = stream.index(b"\xff\xda")
    length = int.from_bytes(stream[sos + 2 : sos + 4], "big")
    header = stream[sos + 4 : sos + 2 + length]
    assert header[0] == 1 and header[3] == 1  # one component; Ss: the predictor, Ra
    assert header[4] == 0 and header[5] == 0  # Se 0, point transform 0
    scan = stream[sos + 2 + length : -2]
    after_ff = np.frombuffer(scan, dtype=np.uint8)[1:][np.frombuffer(scan, np.uint8)[:-1] == 255]
    assert len(after_ff) > 0 and (after_ff == 0).all() and scan[-1] != 0xFF  # no marker


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="values must be in 0..4095"):
        ljpeg.encode(np.full((2, 2), 4096, dtype=np.uint16), 12)
    with pytest.raises(ValueError, match="2D frame"):
        ljpeg.encode(np.zeros((2, 2, 2), dtype=np.uint16), 12)
    with pytest.raises(ValueError, match="precision"):
        ljpeg.encode(np.zeros((2, 2), dtype=np.uint16), 17)
