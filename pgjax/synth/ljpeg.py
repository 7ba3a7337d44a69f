"""A JPEG lossless encoder, process 14, first-order prediction (selection value 1): the codec of
the DICOM transfer syntax 1.2.840.10008.1.2.4.70, which pydicom can decode (pylibjpeg-libjpeg,
GDCM) but not write. For the clinical benchmark corpus (pgjax/synth/clinical.py); NumPy only.

ITU-T T.81 (ISO/IEC 10918-1), Annex H. One component, precision 2-16 bits, point transform 0,
no restart intervals, one Huffman table made for the image (Annex K.2). Prediction: the pixel
to the left (Ra); the first pixel of the image is predicted by 2^(P-1), the first of every
other row by the pixel above (H.1.2.1). The difference is taken modulo 2^16 and coded as a
category SSSS (its bit length) and SSSS extra bits; SSSS 16 stands for the difference 32768
and has no extra bits (H.1.2.2, Table H.2).
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

SELECTION_VALUE = 1  # predictor Ra
_CATEGORIES = 17  # SSSS 0..16
_MAX_CODE_LENGTH = 16


def _categories(diff: np.ndarray) -> np.ndarray:
    """SSSS of each difference (int32, |d| <= 32768): the bit length of its magnitude."""
    magnitude = np.abs(diff).astype(np.uint32)
    ssss = np.zeros(diff.shape, dtype=np.uint8)
    nonzero = magnitude > 0
    # frexp gives the exponent e with m = f * 2^e, 0.5 <= f < 1: e is the bit length of m.
    ssss[nonzero] = np.frexp(magnitude[nonzero].astype(np.float64))[1]
    return ssss


def _code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol, at most 16 bits, no code of all ones (Annex K.2: a
    reserved symbol of frequency 1 takes that code, then lengths over 16 are folded)."""
    counts = [int(f) for f in freq] + [1]  # the last symbol is the reserved one
    used = [i for i, f in enumerate(counts) if f > 0]
    lengths = [0] * len(counts)
    if len(used) == 1:  # cannot happen with the reserved symbol, but a tree needs two leaves
        lengths[used[0]] = 1
    heap = [(counts[i], i, [i]) for i in used]  # ties broken by symbol: deterministic
    heapq.heapify(heap)
    while len(heap) > 1:
        f1, k1, s1 = heapq.heappop(heap)
        f2, k2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, min(k1, k2), s1 + s2))
    # Annex K, Figure K.3: fold the code lengths over 16 into shorter ones.
    bits = [0] * 64
    for n in lengths:
        if n:
            bits[n] += 1
    i = len(bits) - 1
    while i > _MAX_CODE_LENGTH:
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        i -= 1
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol: it had one of the longest codes
    # Hand the lengths back to the symbols, the most frequent first (Figure K.4's order).
    order = sorted(range(len(freq)), key=lambda s: (-counts[s], s))
    out = np.zeros(len(freq), dtype=np.int64)
    n = 1
    for s in order:
        if counts[s] == 0:
            break
        while bits[n] == 0:
            n += 1
        out[s] = n
        bits[n] -= 1
    return out


def _canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """Codes per symbol (Annex C), and the DHT table's BITS (count per length 1..16) and
    HUFFVAL (symbols by increasing code length, then by symbol)."""
    huffval = sorted((s for s in range(len(lengths)) if lengths[s]), key=lambda s: (lengths[s], s))
    bits = [int((lengths == n).sum()) for n in range(1, _MAX_CODE_LENGTH + 1)]
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, n = 0, 1
    for s in huffval:
        while n < lengths[s]:
            code <<= 1
            n += 1
        codes[s] = code
        code += 1
    return codes, bits, huffval


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the low `lengths[i]` bits of each `values[i]` (<= 32 bits each), MSB first,
    pad the last byte with 1 bits and stuff a 0 byte after every 0xFF (B.1.1.5, F.1.2.3)."""
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    n_bytes = (total + 7) // 8
    out = np.zeros(n_bytes + 8, dtype=np.uint8)
    # Each code lands in at most 5 bytes from the byte holding its first bit: place it in a
    # 40-bit window there, and add the window's bytes in (codes never overlap, so + is |).
    block = 1 << 20
    for a in range(0, len(values), block):
        v = values[a : a + block].astype(np.uint64)
        n = lengths[a : a + block].astype(np.uint64)
        s = starts[a : a + block]
        window = v << (np.uint64(40) - (s % 8).astype(np.uint64) - n)
        first = s // 8
        for k in range(5):
            byte = (window >> np.uint64(8 * (4 - k))) & np.uint64(0xFF)
            out[: n_bytes + 8] += np.bincount(
                first + k, weights=byte.astype(np.float64), minlength=n_bytes + 8
            ).astype(np.uint8)
    out = out[:n_bytes]
    if total % 8:
        out[-1] |= (1 << (8 - total % 8)) - 1
    stuffed = np.repeat(out, 1 + (out == 0xFF))
    stuffed[np.flatnonzero(out == 0xFF) + np.arange(1, int((out == 0xFF).sum()) + 1)] = 0
    return stuffed.tobytes()


def _differences(image: np.ndarray, precision: int) -> np.ndarray:
    """Selection value 1 differences modulo 2^16, as int32 in -32768..32767 (-32768 is the
    difference 32768: category 16 either way)."""
    x = image.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra
    pred[1:, 0] = x[:-1, 0]  # Rb: the first pixel of a row after the first
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) & 0xFFFF
    return np.where(diff >= 32768, diff - 65536, diff).astype(np.int32)


def encode(image: np.ndarray, precision: int) -> bytes:
    """One frame [rows, cols] of unsigned values below 2^precision -> a JPEG lossless SV1 stream."""
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected one non-empty 2D frame, got shape {image.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16 bits, not {precision}")
    if image.min() < 0 or int(image.max()) >= 1 << precision:
        raise ValueError(f"values must be in 0..{(1 << precision) - 1} for {precision} bits")
    rows, cols = image.shape
    if rows > 65535 or cols > 65535:
        raise ValueError(f"a JPEG frame is at most 65535 a side, not {image.shape}")
    diff = _differences(image, precision).ravel()
    ssss = _categories(diff)
    lengths = _code_lengths(np.bincount(ssss, minlength=_CATEGORIES))
    codes, bits, huffval = _canonical_codes(lengths)
    # Extra bits: the low SSSS bits of the difference, of difference - 1 when it is negative
    # (F.1.2.1.1); none for SSSS 16.
    d = diff.astype(np.int64)
    extra = np.where(d < 0, d - 1, d) & ((np.int64(1) << ssss.astype(np.int64)) - 1)
    extra_bits = np.where(ssss == 16, 0, ssss).astype(np.int64)
    values = (codes[ssss] << extra_bits) | np.where(ssss == 16, 0, extra)
    scan = _pack_bits(values, lengths[ssss] + extra_bits)
    sof = struct.pack(">HBHHB", 11, precision, rows, cols, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00, *bits, *huffval])
    sos = bytes([1, 1, 0x00, SELECTION_VALUE, 0, 0])  # Ns, Cs, Td/Ta, Ss, Se, Ah/Al
    return b"".join(
        [
            b"\xff\xd8",
            b"\xff\xc3" + sof,
            b"\xff\xc4" + struct.pack(">H", 2 + len(dht)) + dht,
            b"\xff\xda" + struct.pack(">H", 2 + len(sos)) + sos,
            scan,
            b"\xff\xd9",
        ]
    )
