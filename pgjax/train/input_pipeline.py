"""Store -> Grain -> global arrays on the mesh.

One Grain record is one training step's batch for this process: a single TensorStore read
of the batch's rows (an index-array read), not one read per image. Grain costs tens of
microseconds per record, so per-image records would cap a host at a few thousand images/s.

Order: step s of epoch e reads rows perm_e[s*B : (s+1)*B] of the split's usable rows, where
perm_e is a permutation seeded by (seed, e). Process p of P takes its contiguous slice of that
global batch. So the batch at a step is a pure function of (seed, step): resuming needs only
the step, and one process or two read the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from pgjax.data import store as st

ARRAYS = ("pixels", "tokens", "values", "value_mask")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    store: str
    group: str = "images"  # or "volumes"
    splits: tuple[str, ...] = ("train",)
    global_batch: int = 64
    seed: int = 0
    workers: int = 0  # Grain worker processes (spawned); 0 reads in the training process
    prefetch: int = 2  # batches buffered per worker


def usable_rows(store_path: str, group: str, splits: Sequence[str]) -> np.ndarray:
    """Rows of the group that decoded (ok == 1) and belong to the given splits, ascending."""
    table = st.open_store(store_path).group(group).table()
    keep = (table["ok"] == "1") & np.isin(table["split"], list(splits))
    return table["row"][keep].astype(np.int64)


class BatchSource:
    """Random access by step: `source[step]` is this process's share of that step's batch."""

    def __init__(self, cfg: InputConfig, process_index: int = 0, process_count: int = 1):
        if cfg.global_batch % process_count:
            raise ValueError(
                f"global batch {cfg.global_batch} does not split over {process_count} processes"
            )
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        self.rows = usable_rows(cfg.store, cfg.group, cfg.splits)
        self.steps_per_epoch = len(self.rows) // cfg.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.store}: {len(self.rows)} usable {cfg.group} in splits {cfg.splits}, "
                f"fewer than one global batch of {cfg.global_batch}"
            )
        self._arrays = None  # opened lazily: each Grain worker opens its own handles

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

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one source per process, bounded cache
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))

    def global_rows(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        b = self.cfg.global_batch
        return self.rows[self._permutation(epoch)[k * b : (k + 1) * b]]

    def local_rows(self, step: int) -> np.ndarray:
        rows = self.global_rows(step)
        per = len(rows) // self.process_count
        return rows[self.process_index * per : (self.process_index + 1) * per]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._open()
        rows = self.local_rows(int(step))
        # Issue all reads, then wait: TensorStore overlaps them.
        futures = {name: arr[rows].read() for name, arr in self._arrays.items()}
        batch = {name: f.result() for name, f in futures.items()}
        batch["row"] = rows
        batch["step"] = np.int64(step)
        return batch


def make_iterator(cfg: InputConfig, start_step: int, process_index=0, process_count=1):
    """A Grain iterator over steps start_step, start_step+1, ... of this process's batches."""
    import grain

    source = BatchSource(cfg, process_index, process_count)
    ds = grain.MapDataset.range(start_step, np.iinfo(np.int32).max).map(source.__getitem__)
    it_ds = ds.to_iter_dataset()
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
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in ARRAYS}
