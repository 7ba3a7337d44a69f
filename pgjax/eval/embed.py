"""Frozen embeddings of store items from a pretraining checkpoint (or a random init of its model,
or that init with published weights loaded into its image encoder: a transfer model).

The image encoder runs in eval mode (no dropout, running statistics) through
`Objective.embed_images`, jitted once: every batch is padded to the same size, so one compiled
program serves a whole store. Embeddings are cached per model in the eval folder, keyed by the
checkpoint step and the store's manifest, so a killed or repeated evaluation does not recompute
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgjax.data.store import open_array, open_store


@dataclasses.dataclass
class Model:
    """A model under evaluation: a pretraining workdir's checkpoint, or a random init of it.

    transfer: no pretraining; the workdir holds a config only, and the image encoder is loaded
    from its `init.from` (published weights, pgjax/train/init_from.py) over a random init with
    `init_seed` (what the checkpoint does not cover, with init.strict=False).
    """

    name: str
    workdir: Path
    random_init: bool = False
    init_seed: int = 0
    transfer: bool = False

    @property
    def config(self) -> ml_collections.ConfigDict:
        return load_workdir_config(self.workdir)


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a pretraining workdir (no config.json)")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable config: {e}") from e


def store_fingerprint(store: str | Path) -> str:
    """Changes when the store is rebuilt (manifest) or its vocabulary changes."""
    root = Path(store)
    h = hashlib.sha256()
    for name in ("manifest.json", "vocab.json"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


class Embedder:
    """Image (and protocol) embeddings of store rows for one model."""

    def __init__(self, model: Model, store: str | Path, *, group: str = "images", batch: int = 64):
        from pgjax.objectives import ProtocolInfo, build_objective

        self.model = model
        self.store = Path(store)
        self.group = group
        self.batch = batch
        config = model.config
        self.config = config
        train_store = Path(str(config.input.store))
        vocab = open_store(self.store).vocabulary()
        if train_store.resolve() != self.store.resolve() and (train_store / "vocab.json").exists():
            if (train_store / "vocab.json").read_bytes() != (
                self.store / "vocab.json"
            ).read_bytes():
                # Token ids would mean other values: the protocol encoder would read nonsense.
                self.protocol_ok = False
                vocab = open_store(train_store).vocabulary()
            else:
                self.protocol_ok = True
        else:
            self.protocol_ok = True
        self.objective = build_objective(config, ProtocolInfo.from_vocabulary(vocab), None)
        self.has_protocol = "protocol_encoder" in self.objective.parts and self.protocol_ok
        self.step = None
        self.init_record = None
        if model.random_init or model.transfer:
            self.variables = self._random_variables()
            if model.transfer:
                self.variables, self.init_record = self._transfer(self.variables)
        else:
            from pgjax.train.checkpoint import load_state

            state, self.step = load_state(model.workdir)
            self.variables = {"params": state["params"], **state["model_state"]}
        self._image_fn = jax.jit(self.objective.embed_images)
        self._protocol_fn = jax.jit(self.objective.embed_protocol) if self.has_protocol else None

    def _random_variables(self) -> dict:
        """Fresh encoder parameters (only the parts embedding reads: initialising the whole
        objective would compile every head for nothing)."""
        from pgjax.objectives.base import takes_train

        example = self.read(np.zeros(1, dtype=np.int64))
        key = jax.random.key(self.model.init_seed)
        inputs = {"image_encoder": (example["image"],),
                  "protocol_encoder": (example["tokens"], example["values"],
                                       example["value_mask"])}  # fmt: skip
        variables: dict = {"params": {}}
        for i, name in enumerate(n for n in inputs if n in self.objective.parts):
            module = self.objective.parts[name]
            kw = {"train": False} if takes_train(module) else {}
            k = jax.random.fold_in(key, i)
            v = jax.jit(lambda k, *a, m=module, kw=kw: m.init({"params": k, "dropout": k}, *a,
                                                               **kw))(k, *inputs[name])  # fmt: skip
            v = dict(jax.tree.map(np.asarray, v))
            variables["params"][name] = v.pop("params")
            for col, tree in v.items():
                variables.setdefault(col, {})[name] = tree
        return variables

    def _transfer(self, variables: dict) -> tuple[dict, dict]:
        from pgjax.train import init_from

        spec = init_from.InitSpec.from_config(self.config)
        if spec is None:
            raise ValueError(f"{self.model.name}: a transfer model needs init.from in its config "
                             f"({self.model.workdir.name}/config.json)")  # fmt: skip
        module = self.objective.parts["image_encoder"]
        shape = self.read(np.zeros(1, dtype=np.int64))["image"].shape
        return init_from.load_part(spec, variables, module,
                                   grid=init_from.patch_grid(module, shape))  # fmt: skip

    # ------------------------------------------------------------------------------ reading

    def _arrays(self):
        if not hasattr(self, "_opened"):
            root = self.store / self.group
            self._opened = {n: open_array(root / n) for n in ("pixels", "tokens", "values",
                                                               "value_mask")}  # fmt: skip
        return self._opened

    def read(self, rows: np.ndarray) -> dict:
        """Model inputs for store rows, as in pretraining (pgjax.train.train.prepare_batch)."""
        from pgjax.train.train import prepare_batch

        arrays = self._arrays()
        futures = {n: a[rows].read() for n, a in arrays.items()}
        return prepare_batch({n: jnp.asarray(f.result()) for n, f in futures.items()})

    def batches(self, rows: np.ndarray, size: int | None = None):
        """(inputs, n_real) per batch, each padded to `size` rows (default: the embedder's
        batch), so that one compiled program serves every batch."""
        rows = np.asarray(rows, dtype=np.int64)
        size = size or self.batch
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            n = len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - n)])
            yield self.read(padded), n

    # ------------------------------------------------------------------------------ embedding

    def embed(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{"image": [N, D]} and, for models with a protocol encoder, {"protocol": [N, W]}."""
        images, protocols = [], []
        for inputs, n in self.batches(rows):
            images.append(np.asarray(self._image_fn(self.variables, inputs["image"]))[:n])
            if self._protocol_fn is not None:
                p = self._protocol_fn(
                    self.variables, inputs["tokens"], inputs["values"], inputs["value_mask"]
                )
                protocols.append(np.asarray(p)[:n])
        out = {"image": np.concatenate(images)}
        if protocols:
            out["protocol"] = np.concatenate(protocols)
        return out


def cached_embeddings(
    model: Model, store: str | Path, rows: np.ndarray, cache_dir: str | Path, *, group="images",
    batch: int = 64,
) -> tuple[dict[str, np.ndarray], Embedder | None]:  # fmt: skip
    """Embeddings of `rows`, from cache_dir/<model>.npz when it matches (same checkpoint step,
    store and rows), else computed and cached. Returns (embeddings, the Embedder if one was
    built: fine-tuning needs it)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{model.name}.npz"
    key = {
        "store": store_fingerprint(store),
        "group": group,
        "rows": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16],
        "step": None if model.random_init or model.transfer else _latest_step(model.workdir),
        "random_init": model.random_init,
        "init_seed": model.init_seed,
    }
    if model.transfer:  # the weights' content, so that another file is not served from cache
        key["transfer"] = transfer_key(model)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) == key:
                return {k: z[k] for k in z.files if k != "key"}, None
    embedder = Embedder(model, store, group=group, batch=batch)
    out = embedder.embed(rows)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=json.dumps(key), **out)
    tmp.replace(path)  # atomic: a killed run leaves no half-written cache
    return out, embedder


def transfer_key(model: Model) -> dict:
    from pgjax.train import init_from

    spec = init_from.InitSpec.from_config(model.config)
    if spec is None:
        raise ValueError(f"{model.name}: a transfer model needs init.from in its config")
    if not spec.path.is_file():
        raise FileNotFoundError(f"{spec.path}: no such checkpoint file (config field init.from)")
    return {"sha256_16": init_from.file_digest(spec.path), "strict": spec.strict,
            "stem": spec.stem, "prefix": spec.prefix, "format": spec.format}  # fmt: skip


def _latest_step(workdir: Path) -> int:
    root = Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{root}: no checkpoints")
    return steps[-1]
