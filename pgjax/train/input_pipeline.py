"""Store -> Grain -> global arrays on the mesh.

One Grain record is one training step's batch for this process: a single TensorStore read
of the batch's rows (an index-array read), not one read per image. Grain costs tens of
microseconds per record, so per-image records would cap a host at a few thousand images/s.

Order: step s of epoch e reads rows perm_e[s*B : (s+1)*B] of the split's usable rows, where
perm_e is a permutation seeded by (seed, e). Process p of P takes its contiguous slice of that
global batch. So the batch at a step is a pure function of (seed, step): resuming needs only
the step, and one process or two read the same global batch.

Series partners (`partners=True`, for cross-series protocol translation): each item also gets
the protocol of one other series of its own study (a random item of that series, drawn as a
function of (seed, step)), as partner_tokens/partner_values/partner_value_mask, and
has_partner = 0 where its study has a single series (its own protocol stands in, unused).

Speed (`pgjax bench loader`): TensorStore writes each batch straight into a fresh 64-byte
aligned buffer (no copy after the read, and on a CPU backend JAX then uses the buffer as is
instead of copying it), and the small per-row token arrays are held in memory when they fit
`token_cache_mb`: stored one row per chunk, reading them through TensorStore costs almost as
much per row as a 64 KiB image. One Grain thread reads ahead (`read_threads`): a record is a
whole batch and TensorStore already reads its chunks in parallel, so more threads only compete
with it for the cores (`python tools/profile_loader.py STORE` compares 1 and 2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from pgjax.data import store as st

ARRAYS = ("pixels", "tokens", "values", "value_mask")
PROTOCOL_ARRAYS = ("tokens", "values", "value_mask")
PARTNER_ARRAYS = ("partner_tokens", "partner_values", "partner_value_mask", "has_partner")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    store: str
    group: str = "images"  # or "volumes"
    splits: tuple[str, ...] = ("train",)
    global_batch: int = 64
    seed: int = 0
    workers: int = 0  # Grain worker processes (spawned); 0 reads in the training process
    prefetch: int = 2  # batches read ahead (in flight or buffered) per worker
    read_threads: int = 1  # Grain threads issuing those reads, per worker
    # Token arrays (tokens, values, value_mask) of the group held in memory per process when
    # together they take at most this many MiB (31 fields: ~280 MiB per million rows).
    token_cache_mb: int = 512
    partners: bool = False  # also read a partner series' protocol per item (see module doc)


def usable_rows(store_path: str, group: str, splits: Sequence[str]) -> np.ndarray:
    """Rows of the group that decoded (ok == 1) and belong to the given splits, ascending."""
    return _usable(st.open_store(store_path).group(group).table(), splits)[0]


def _usable(table: dict, splits: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    keep = (table["ok"] == "1") & np.isin(table["split"], list(splits))
    return table["row"][keep].astype(np.int64), keep


class SeriesPartners:
    """For each usable item, the usable items of its study that belong to another series.

    Items are sorted by (study, series), so an item's candidates are its study's block minus
    its own series' block: two ranges, drawn from in O(1) per item without per-item lists (a
    million-image store costs a few arrays of int64).
    """

    def __init__(self, study: np.ndarray, series: np.ndarray):
        n = len(study)
        self.order = np.lexsort((series, study))  # positions into the usable rows
        st_sorted, se_sorted = study[self.order], series[self.order]
        new_study = np.r_[True, st_sorted[1:] != st_sorted[:-1]]
        new_series = new_study | np.r_[True, se_sorted[1:] != se_sorted[:-1]]
        study_start = np.maximum.accumulate(np.where(new_study, np.arange(n), 0))
        series_start = np.maximum.accumulate(np.where(new_series, np.arange(n), 0))
        study_len = np.diff(np.r_[np.flatnonzero(new_study), n])
        series_len = np.diff(np.r_[np.flatnonzero(new_series), n])
        # Per sorted position: its study's and series' start, its series' length, and its
        # number of candidates (the study's other series).
        self.study_start = study_start
        self.series_start = series_start
        self.series_len = series_len[np.cumsum(new_series) - 1]
        self.candidates = study_len[np.cumsum(new_study) - 1] - self.series_len
        self.rank = np.empty(n, np.int64)  # usable position -> sorted position
        self.rank[self.order] = np.arange(n)

    def count(self, positions: np.ndarray) -> np.ndarray:
        """Number of partner candidates of the items at these usable positions."""
        return self.candidates[self.rank[positions]]

    def draw(self, positions: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partner positions, has_partner) for items at usable positions, u uniform [0, 1)."""
        r = self.rank[positions]
        count = self.candidates[r]
        j = np.minimum((u * count).astype(np.int64), np.maximum(count - 1, 0))
        before = self.series_start[r] - self.study_start[r]  # candidates before own series
        sorted_pos = self.study_start[r] + np.where(j < before, j, j + self.series_len[r])
        has = count > 0
        partner = np.where(has, self.order[np.minimum(sorted_pos, len(self.order) - 1)], positions)
        return partner, has


class BatchSource:
    """Random access by step: `source[step]` is this process's share of that step's batch."""

    def __init__(self, cfg: InputConfig, process_index: int = 0, process_count: int = 1):
        if cfg.global_batch % process_count:
            raise ValueError(
                f"global batch {cfg.global_batch} does not split over {process_count} processes"
            )
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        table = st.open_store(cfg.store).group(cfg.group).table()
        self.rows, keep = _usable(table, cfg.splits)
        if cfg.partners and not {"study_key", "series_key"} <= set(table):
            raise ValueError(
                f"{cfg.store}/{cfg.group}/table.csv: no study_key/series_key columns, which "
                "series partners (cross-series translation) need; rebuild the store with "
                "`pgjax preprocess` or set objectives.translation.series_weight=0"
            )
        self.partners = (
            SeriesPartners(table["study_key"][keep], table["series_key"][keep])
            if cfg.partners
            else None
        )
        self.steps_per_epoch = len(self.rows) // cfg.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.store}: {len(self.rows)} usable {cfg.group} in splits {cfg.splits}, "
                f"fewer than one global batch of {cfg.global_batch}"
            )
        self._arrays = None  # opened lazily: each Grain worker opens its own handles
        self._token_cache: dict[str, np.ndarray] = {}

    def _open(self):
        import tensorstore as ts

        root = f"{self.cfg.store}/{self.cfg.group}"
        # Read-only and immutable: no revalidation per read; the cache keeps shard indices.
        context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
        self._arrays = {
            name: ts.open(
                {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": f"{root}/{name}"},
                    "recheck_cached_data": "open",
                },
                read=True,
                context=context,
            ).result()
            for name in ARRAYS
        }
        tokens = [self._arrays[name] for name in PROTOCOL_ARRAYS]
        size = sum(a.dtype.numpy_dtype.itemsize * int(np.prod(a.shape)) for a in tokens)
        if size <= self.cfg.token_cache_mb << 20:
            # One read of each whole array (sequential, once per process) instead of one
            # chunk per row per batch.
            futures = {name: self._arrays[name].read() for name in PROTOCOL_ARRAYS}
            self._token_cache = {name: f.result() for name, f in futures.items()}

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one source per process, bounded cache
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))

    def _global_positions(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        b = self.cfg.global_batch
        return self._permutation(epoch)[k * b : (k + 1) * b]

    def global_rows(self, step: int) -> np.ndarray:
        return self.rows[self._global_positions(step)]

    def _local(self, x: np.ndarray) -> np.ndarray:
        per = len(x) // self.process_count
        return x[self.process_index * per : (self.process_index + 1) * per]

    def local_rows(self, step: int) -> np.ndarray:
        return self._local(self.global_rows(step))

    def partner_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's (partner rows, has_partner) at a step; drawn over the global batch,
        so every process agrees whatever the process count."""
        positions = self._global_positions(step)
        u = np.random.default_rng([self.cfg.seed, step, 1]).random(len(positions))
        partner, has = self.partners.draw(positions, u)
        return self._local(self.rows[partner]), self._local(has)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        import tensorstore as ts

        if self._arrays is None:
            self._open()
        step = int(step)
        rows = self.local_rows(step)
        # Issue all reads, then wait: TensorStore overlaps them.
        reads = [(name, name, rows) for name in ARRAYS]  # (batch key, array, rows)
        if self.partners is not None:
            partner, has = self.partner_rows(step)
            reads += [(f"partner_{name}", name, partner) for name in PROTOCOL_ARRAYS]
        batch, futures = {}, []
        for key, name, at in reads:
            if name in self._token_cache:
                batch[key] = self._token_cache[name][at]
                continue
            arr = self._arrays[name]
            batch[key] = aligned_empty((len(at), *arr.shape[1:]), arr.dtype.numpy_dtype)
            target = ts.array(batch[key], copy=False, write=True)
            futures.append(target.write(arr[at]))
        for f in futures:
            f.result()
        if self.partners is not None:
            batch["has_partner"] = has.astype(np.uint8)
        batch["row"] = rows
        batch["step"] = np.int64(step)
        return batch


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary (NumPy only
    promises 16; XLA's CPU client aliases host buffers aligned to 64 instead of copying)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def make_iterator(cfg: InputConfig, start_step: int, process_index=0, process_count=1):
    """A Grain iterator over steps start_step, start_step+1, ... of this process's batches."""
    import grain

    source = BatchSource(cfg, process_index, process_count)
    ds = grain.MapDataset.range(start_step, np.iinfo(np.int32).max).map(source.__getitem__)
    # Grain's default read-ahead is 500 records on 16 threads: 500 batches of 256 images of
    # 256x256 would be 8 GiB per process. A few batches ahead keep TensorStore busy.
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    it_ds = ds.to_iter_dataset(read)
    if cfg.workers > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.workers, per_worker_buffer_size=cfg.prefetch
            )
        )
    return iter(it_ds), source


def _absl_flags_parsed() -> None:
    # Grain's multiprocessing reads absl flags; with JAX installed they exist but are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_global(batch: dict[str, np.ndarray], sharding) -> dict:
    """Place this process's share of a batch onto the mesh as global jax.Arrays."""
    import jax

    # Only what the model consumes: "row" and "step" stay on the host (row ids are for
    # debugging and evaluation, not for the train step).
    names = ARRAYS + (PARTNER_ARRAYS if "has_partner" in batch else ())
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in names}
