"""Preprocessing settings. Every field is recorded in the store manifest.

Defaults are what we would defend for chest/brain pretraining at 256 px; where the Protocol Genome
paper is silent (it gives no preprocessing details) the choice is ours and documented here.
"""

from __future__ import annotations

import dataclasses

# The most pixels (rows x columns x samples) one frame may declare: 10000 x 10000 grey, 5773 x
# 5773 colour. Decoders allocate what the header declares, so a tiny hostile file could ask for
# gigabytes; the largest clinical images (mammograms, about 4000 x 5000) are far below this.
DEFAULT_MAX_PIXELS = 100_000_000


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    # 2D images: every item is resized to this (rows, cols).
    image_size: tuple[int, int] = (256, 256)
    # uint8 is enough for windowed 8-bit display contrast; uint16 keeps 12-bit detail.
    dtype: str = "uint8"
    # "letterbox" keeps the aspect ratio and pads with 0; "stretch" ignores it.
    resize: str = "letterbox"
    # CT: Hounsfield units through one window (center, width). 40/400 is the soft-tissue /
    # mediastinal window, a common single-channel choice for chest CT (PE is read there).
    ct_window: tuple[float, float] = (40.0, 400.0)
    # MR and anything without a calibrated scale: robust percentile scaling (low, high).
    percentiles: tuple[float, float] = (0.5, 99.5)
    # CT/MR series with at least this many slices are also assembled into a volume.
    min_volume_slices: int = 8
    # Volumes are resampled to (slices, rows, cols) along the slice normal.
    volume_shape: tuple[int, int, int] = (64, 128, 128)
    store_volumes: bool = True
    # At most this many evenly spaced slices of a CT/MR series become 2D items (0: all).
    # A million CT studies of 300 slices each would otherwise be 3e8 near-duplicate images.
    slices_per_series: int = 16
    # Other multi-frame objects (US cine, XA): at most this many evenly spaced frames (0: all).
    frames_per_instance: int = 1
    # De-identification: a categorical value is kept only if seen for this many distinct
    # patients in the training split; rarer values become the unknown token.
    min_patients: int = 5
    # Numeric fields: number of quantile bins fitted on the training split.
    numeric_bins: int = 16
    # Patient-level split fractions (train, val, test) at the non-external sites.
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    # Whole sites held out as the "external" split, as the store's site column names them.
    external_sites: tuple[str, ...] = ()
    # Where the site label comes from: "dir" (a salted key of the first folder below each input
    # root, or the name an explicit --site-names mapping gives that folder: a folder name can
    # name a patient), "header" (salted key of InstitutionName), or "fixed:NAME".
    site_from: str = "dir"
    # Files declaring more pixels than this per frame (rows x columns x samples) are skipped
    # before anything is allocated (see DEFAULT_MAX_PIXELS).
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Zarr shard sizes along the item axis: one shard file per this many items.
    images_per_shard: int = 256
    volumes_per_shard: int = 8

    def __post_init__(self):
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype must be uint8 or uint16, not {self.dtype!r}")
        if self.resize not in ("letterbox", "stretch"):
            raise ValueError(f"resize must be letterbox or stretch, not {self.resize!r}")
        if not (self.site_from in ("dir", "header") or self.site_from.startswith("fixed:")):
            raise ValueError(f"site_from must be dir, header or fixed:NAME, not {self.site_from!r}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1: {self.split_fractions}")
        if self.min_patients < 1:
            raise ValueError("min_patients must be >= 1")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, not {self.max_pixels}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> PreprocessConfig:
        obj = dict(obj)
        for k, v in obj.items():
            if isinstance(v, list):
                obj[k] = tuple(v)
        return cls(**obj)
