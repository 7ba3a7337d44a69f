"""Protocol novelty: how unlike the training split an item's acquisition protocol is.

The protocol distribution of a checkpoint is recorded from the items it pretrained on (its
config's store, group and splits):

  token_counts   [F, V] items of the training split holding token v in field f (specials too)
  mean, precision  of the pooled protocol embedding (`embed_protocol`), the covariance shrunk
                 towards a scaled identity by Ledoit-Wolf (2004) so that it is invertible even
                 with fewer items than dimensions
  train_quantiles  the training items' own distances (50, 90, 95, 99th percentiles): a
                 deployment threshold in the score's units

An item's novelty is its Mahalanobis distance sqrt((p - mean)' precision (p - mean)) and the
list of its unusual field values: "Field=value" for every field whose token is unseen on the
training split ("unseen") or held by fewer than `rare_fraction` of its items ("rare"). Values are
token strings of the protocol vocabulary (allow-listed values, bins, `<unk>` for a value too rare
to have a token), never raw header text.

The record is computed from the checkpoint and its store the first time export, evaluation or
inference needs it, and cached with the checkpoint (WORKDIR/protocol_stats/step_N.npz, keyed by
the store's fingerprint): it then always belongs to the exact weights it describes (a record made
during training would describe one step only, and a resumed run would have to redo it), it
costs training nothing, and checkpoints written before this existed get one too. `pgjax export`
copies it into the export (OUT/protocol_stats.npz), where `modeling_pgjax.py` reads it with
NumPy alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

STATS_FORMAT = "pgjax-protocol-stats"
STATS_VERSION = 1
STATS_FILE = "protocol_stats.npz"
RARE_FRACTION = 0.01
MAX_ITEMS = 20000  # items embedded for the mean and covariance (all items count tokens)
QUANTILES = (50, 90, 95, 99)
_PAD = 0


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of the rows of x (Ledoit and Wolf 2004; the estimator of
    sklearn.covariance.ledoit_wolf, without its block splitting)."""
    x = np.asarray(x, np.float64)
    n, p = x.shape
    if n < 2:
        raise ValueError(f"the covariance needs at least 2 items, got {n}")
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = float(np.trace(emp)) / p
    x2 = xc**2
    beta_ = float(np.sum(x2.T @ x2))
    delta_ = float(np.sum(emp**2))
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(emp)) + p * mu**2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else beta / delta
    shrunk = (1.0 - shrinkage) * emp
    # All items identical (mu = 0): a tiny isotropic floor keeps the matrix invertible; any
    # difference from the training items is then very novel, as it should be.
    shrunk[np.diag_indices(p)] += shrinkage * mu + max(mu, 1.0) * 1e-9
    return shrunk, float(shrinkage)


@dataclasses.dataclass
class ProtocolStats:
    """The recorded protocol distribution of one checkpoint; see the module docstring."""

    fields: list[str]  # the store's protocol keywords, in token-column order
    token_names: list[str]  # the value string of each token id
    token_counts: np.ndarray  # int64 [F, V]
    n_items: int
    mean: np.ndarray | None  # float64 [W]; None for a model without a protocol encoder
    precision: np.ndarray | None  # float64 [W, W]
    shrinkage: float | None
    n_embedded: int
    train_quantiles: dict[str, float]
    rare_fraction: float = RARE_FRACTION
    source: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------ scores

    @property
    def has_embedding(self) -> bool:
        return self.mean is not None

    def distance(self, protocol_embedding) -> np.ndarray:
        """Mahalanobis distance [N] of pooled protocol embeddings [N, W] from the training
        distribution."""
        if self.mean is None:
            raise ValueError("these protocol statistics have no embedding distribution (the "
                             "model has no protocol encoder)")  # fmt: skip
        d = np.asarray(protocol_embedding, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nw,wv,nv->n", d, self.precision, d), 0.0))

    def unusual(self, tokens) -> list[list[str]]:
        """Per item, "Field=value (unseen)" / "Field=value (rare)" for each field whose token
        is unseen in the training split or held by fewer than rare_fraction of its items."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != len(self.fields):
            raise ValueError(f"tokens must be [N, {len(self.fields)}], got {tokens.shape}")
        counts = self.token_counts[np.arange(len(self.fields))[None, :], tokens]
        rare = counts < self.rare_fraction * self.n_items
        out = []
        for k in range(len(tokens)):
            hits = []
            for f in np.flatnonzero(rare[k] & (tokens[k] != _PAD)):
                kind = "unseen" if counts[k, f] == 0 else "rare"
                hits.append(f"{self.fields[f]}={self.token_names[tokens[k, f]]} ({kind})")
            out.append(hits)
        return out

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": STATS_FORMAT, "version": STATS_VERSION, "n_items": self.n_items,
                "n_embedded": self.n_embedded, "shrinkage": self.shrinkage,
                "rare_fraction": self.rare_fraction, "train_quantiles": self.train_quantiles,
                "source": self.source}  # fmt: skip
        arrays = {"fields": np.array(self.fields, dtype=str),
                  "token_names": np.array(self.token_names, dtype=str),
                  "token_counts": self.token_counts.astype(np.int64)}  # fmt: skip
        if self.mean is not None:
            arrays.update(mean=self.mean, precision=self.precision)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=json.dumps(meta, sort_keys=True), **arrays)
        tmp.replace(path)  # atomic: a killed run leaves no half-written record

    @classmethod
    def load(cls, path: str | Path) -> ProtocolStats:
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable protocol statistics: {e}") from e
        with z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
                raise ValueError(f"{path}: not protocol statistics of version {STATS_VERSION} "
                                 f"({meta.get('format')!r} {meta.get('version')!r})")  # fmt: skip
            has = "mean" in z.files
            return cls(
                fields=[str(f) for f in z["fields"]],
                token_names=[str(t) for t in z["token_names"]],
                token_counts=z["token_counts"].astype(np.int64), n_items=int(meta["n_items"]),
                mean=z["mean"] if has else None, precision=z["precision"] if has else None,
                shrinkage=meta["shrinkage"], n_embedded=int(meta["n_embedded"]),
                train_quantiles=meta["train_quantiles"],
                rare_fraction=float(meta["rare_fraction"]), source=meta["source"],
            )  # fmt: skip


def token_names(vocab) -> list[str]:
    """The value string of every token id of a vocabulary (specials: "<unk>", ...)."""
    return [vocab.decode(i)[1] for i in range(vocab.size)]


def fit(tokens: np.ndarray, embeddings: np.ndarray | None, vocab, *,
        rare_fraction: float = RARE_FRACTION, source: dict | None = None):  # fmt: skip
    """The statistics of training items: tokens [N, F] (all of them), pooled protocol
    embeddings [M, W] (all or a sample; None for an image-only model)."""
    tokens = np.asarray(tokens, np.int64)
    if len(tokens) == 0:
        raise ValueError("no training items to record the protocol distribution from")
    n_fields, size = tokens.shape[1], vocab.size
    counts = np.zeros((n_fields, size), np.int64)
    for f in range(n_fields):
        counts[f] = np.bincount(tokens[:, f], minlength=size)[:size]
    mean = precision = shrinkage = None
    quantiles: dict[str, float] = {}
    n_embedded = 0
    if embeddings is not None:
        x = np.asarray(embeddings, np.float64)
        cov, shrinkage = ledoit_wolf(x)
        mean = x.mean(axis=0)
        precision = np.linalg.inv(cov)
        precision = (precision + precision.T) / 2  # exactly symmetric
        n_embedded = len(x)
    stats = ProtocolStats(list(vocab.keywords), token_names(vocab), counts, len(tokens), mean,
                          precision, shrinkage, n_embedded, quantiles, float(rare_fraction),
                          dict(source or {}))  # fmt: skip
    if embeddings is not None:
        d = stats.distance(embeddings)
        stats.train_quantiles.update({f"p{q}": float(np.percentile(d, q)) for q in QUANTILES})
    return stats


# ---------------------------------------------------------------------------------------------
# From a checkpoint


def training_rows(store, group: str, splits) -> np.ndarray:
    """Store rows of the usable items of the training splits (what pretraining read)."""
    from pgjax.data.store import open_store

    table = open_store(store).group(group).table()
    keep = (table["ok"] == "1") & np.isin(table["split"], list(splits))
    return table["row"][keep].astype(np.int64)


def read_tokens(store, group: str, rows: np.ndarray) -> np.ndarray:
    from pgjax.data.store import open_array

    tokens = open_array(Path(store) / group / "tokens")
    out = []
    for start in range(0, len(rows), 65536):  # bounded reads on a large store
        out.append(np.asarray(tokens[rows[start : start + 65536]].read().result()))
    return np.concatenate(out).astype(np.int64)


def for_checkpoint(workdir: str | Path, *, step: int | None = None,
                   store: str | Path | None = None, max_items: int = MAX_ITEMS,
                   rare_fraction: float = RARE_FRACTION, embedder=None) -> ProtocolStats:
    """The protocol statistics of a checkpoint (the latest unless `step`) on its training store
    (or `store`, which must have the same vocabulary), cached in WORKDIR/protocol_stats/."""
    from pgjax.data.store import open_store
    from pgjax.eval.embed import Model, load_workdir_config, store_fingerprint

    workdir = Path(workdir)
    config = load_workdir_config(workdir)
    store = Path(store) if store else Path(str(config.input.store))
    group, splits = str(config.input.group), tuple(str(s) for s in config.input.splits)
    if step is None:
        from pgjax.eval.embed import _latest_step

        step = _latest_step(workdir)
    key = {"store": store_fingerprint(store), "group": group, "splits": list(splits),
           "step": int(step), "max_items": int(max_items),
           "rare_fraction": float(rare_fraction)}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = workdir / "protocol_stats" / f"step_{int(step)}_{digest}.npz"
    if path.exists():
        stats = ProtocolStats.load(path)
        if stats.source.get("key") == key:
            return stats
    rows = training_rows(store, group, splits)
    if len(rows) == 0:
        raise ValueError(f"{store}: no usable {group} items in the splits {list(splits)}")
    tokens = read_tokens(store, group, rows)
    sample = rows
    if len(rows) > max_items:  # a fixed sample: the same record on every run
        sample = np.sort(np.random.default_rng(0).choice(rows, max_items, replace=False))
    if embedder is None:
        from pgjax.eval.embed import Embedder

        embedder = Embedder(Model(workdir.name, workdir), store, group=group)
    if embedder.step is not None and embedder.step != step:
        from pgjax.train.checkpoint import load_state

        state, _ = load_state(workdir, step)
        embedder.variables = {"params": state["params"], **state["model_state"]}
        embedder.step = step
    emb = embedder.embed(sample).get("protocol") if embedder.has_protocol else None
    vocab = open_store(store).vocabulary()
    stats = fit(tokens, emb, vocab, rare_fraction=rare_fraction,
                source={"key": key, "items": f"{group} of splits {', '.join(splits)}"})
    stats.save(path)
    return stats
