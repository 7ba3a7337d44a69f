"""Initialise the image encoder from published weights (`--config.init.from=FILE`).

Reads a timm-layout ViT or ResNet checkpoint (safetensors, or a torch state dict in .pt/.pth/.bin)
or a big_vision ViT `.npz`, and loads it into pgjax's Flax image encoder before pretraining
(`pgjax train`) or a probe without pretraining (an ablation's `transfer` row). Nothing is
downloaded: FILE is a local file.

Every checkpoint is first brought to the names pgjax's exporter writes (timm's, for a ViT;
torchvision's ResNet with `norm`/`downsample_conv` names, as in `pgjax.export.convert`), then the
exporter's rules map each name to its Flax leaf in reverse, so that import and export cannot
disagree on a layout. On the way:

- the stem (ViT `patch_embed.proj`, ResNet `conv1`) of a 3-channel (RGB) checkpoint is reduced
  to pgjax's one channel by summing over the input channels (`init.stem="sum"`, the default, what
  timm's `adapt_input_conv` does for `in_chans=1`): a grey image x then gives exactly what the
  RGB model gives for (x, x, x), so activations keep the scale the checkpoint was trained at.
  `init.stem="mean"` divides by the channel count (the RGB model's output on (x, x, x) / C);
- position embeddings are resampled to the model's patch grid, bicubic with antialiasing and
  the class-token entry kept apart, as timm's `resample_abs_pos_embed`;
- classifier heads (timm `head.*`, `head_dist.*`, ResNet `fc.*`, big_vision `head/*`) and
  BatchNorm's `num_batches_tracked` counters are dropped and listed.

Any other parameter left unmatched, in the checkpoint or in the model, is an error that names
it, unless `init.strict=False`: then unmatched checkpoint entries are ignored, unmatched model
parameters keep their random initialisation, and both are listed (log and
WORKDIR/init_from.json). A shape that does not fit is always an error naming the parameter and
both shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from pgjax.export import convert

FORMATS = ("auto", "safetensors", "torch", "big_vision")
STEM_MODES = ("sum", "mean")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch",
            ".npz": "big_vision"}  # fmt: skip
# Classifier heads, per layout after renaming: dropped, not "unmatched".
HEADS = {"vit": ("head.", "head_dist."), "resnet": ("fc.",)}
STEMS = ("patch_embed.proj.weight", "conv1.weight")
# Dicts that torch training scripts wrap a state dict in.
WRAPPERS = ("state_dict", "model", "model_state_dict")
RECORD = "init_from.json"


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """The config's `init` block. path: the checkpoint; format: auto (by suffix: .safetensors,
    .pt/.pth/.bin = torch, .npz = big_vision), safetensors, torch or big_vision; strict: unmatched
    parameters are errors; stem: sum or mean; prefix: read only the checkpoint entries under this
    key prefix (e.g. "visual.trunk." of an open_clip model, "image_encoder." of a pgjax export,
    "img/" of a big_vision SigLIP), with the prefix removed."""

    path: Path
    format: str = "auto"
    strict: bool = True
    stem: str = "sum"
    prefix: str = ""

    @classmethod
    def from_config(cls, config) -> InitSpec | None:
        """None when the config has no `init.from` (older workdirs have no `init` at all)."""
        init = config.get("init") or {}
        path = init.get("from")
        if not path:
            return None
        spec = cls(Path(str(path)), str(init.get("format", "auto")),
                   init.get("strict", True), str(init.get("stem", "sum")),
                   str(init.get("prefix", "") or ""))  # fmt: skip
        if spec.format not in FORMATS:
            raise ValueError(f"config field init.format: {spec.format!r} is not one of {FORMATS}")
        if spec.stem not in STEM_MODES:
            raise ValueError(f"config field init.stem: {spec.stem!r} is not one of {STEM_MODES}")
        if not isinstance(spec.strict, bool):
            raise ValueError(f"config field init.strict: expected True or False, got "
                             f"{spec.strict!r}")  # fmt: skip
        return spec


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint file into {name: float32 array}


def file_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    found = SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise ValueError(f"{path}: cannot tell the checkpoint format from the suffix "
                         f"{path.suffix!r} (known: {sorted(SUFFIXES)}); "
                         "set init.format")  # fmt: skip
    return found


def _float(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def _from_torch_tensors(state: dict) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def read_checkpoint(path: str | Path, fmt: str = "auto") -> dict[str, np.ndarray]:
    """The tensors of a checkpoint file by name; floats as float32 (bf16/fp16 widened)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (config field init.from)")
    fmt = file_format(path, fmt)
    try:
        if fmt == "big_vision":
            with np.load(path, allow_pickle=False) as z:
                state = {k: _float(z[k]) for k in z.files}
        elif fmt == "safetensors":
            from safetensors.numpy import load_file

            try:
                state = {k: _float(v) for k, v in load_file(str(path)).items()}
            except Exception:  # bfloat16 (NumPy has no such dtype): through torch
                from safetensors.torch import load_file as load_torch

                state = _from_torch_tensors(load_torch(str(path)))
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                for key in WRAPPERS:
                    if isinstance(obj.get(key), dict):
                        obj = obj[key]
                        break
            if not isinstance(obj, dict):
                raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
            state = _from_torch_tensors(obj)
    except Exception as e:  # each reader has its own error types; all mean the same here
        raise ValueError(f"{path}: not a readable {fmt} checkpoint: {e}") from e
    if not state:
        raise ValueError(f"{path}: no tensors in this {fmt} checkpoint")
    return state


def _strip_common(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Layouts -> the exporter's torch names


def big_vision_to_timm(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A big_vision ViT (flat "a/b/c" names, Flax layouts) -> timm's names and torch layouts.

    big_vision adds the position embeddings before prepending the class token (which so gets
    none: its timm `pos_embed` entry is zero), fuses nothing (q, k, v and out are separate
    [D, heads, head_dim] kernels), and older checkpoints keep the embeddings under Transformer/
    with a class-token entry folded in (its value moves to the class token, as big_vision's
    `fix_old_checkpoints` does). A scanned encoder (Transformer/encoderblock/..., the depth
    first) is unrolled. Names it does not know are kept as they are, so they surface unmatched.
    """
    src = dict(flat)
    for k in [k for k in src if k.startswith("Transformer/encoderblock/")]:
        stacked = src.pop(k)
        rest = k[len("Transformer/encoderblock/") :]
        for i in range(stacked.shape[0]):
            src[f"Transformer/encoderblock_{i}/{rest}"] = stacked[i]
    out: dict[str, np.ndarray] = {}
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in src:
            src["pos_embedding"] = src.pop(old)
    if "pos_embedding" in src:
        pe = src.pop("pos_embedding")
        n = pe.shape[1]
        if n > 1 and math.isqrt(n - 1) ** 2 == n - 1 and "cls" in src:
            src["cls"] = src["cls"] + pe[:, :1]
            pe = pe[:, 1:]
        if "cls" in src:
            pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
        out["pos_embed"] = pe
    if "cls" in src:
        out["cls_token"] = src.pop("cls")
    if "embedding/kernel" in src:
        k = src.pop("embedding/kernel")
        out["patch_embed.proj.weight"] = k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))
    if "embedding/bias" in src:
        out["patch_embed.proj.bias"] = src.pop("embedding/bias")
    for k, tk in (("scale", "weight"), ("bias", "bias")):
        if f"Transformer/encoder_norm/{k}" in src:
            out[f"norm.{tk}"] = src.pop(f"Transformer/encoder_norm/{k}")
    blocks = sorted({int(m.group(1)) for k in src
                     if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})  # fmt: skip
    for i in blocks:
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = f"{b}MultiHeadDotProductAttention_0/"
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            for k, tk in (("scale", "weight"), ("bias", "bias")):
                if f"{b}{ln}/{k}" in src:
                    out[f"{t}{name}.{tk}"] = src.pop(f"{b}{ln}/{k}")
        qkv = [f"{attn}{p}/{k}" for p in ("query", "key", "value") for k in ("kernel", "bias")]
        if all(k in src for k in qkv):
            kernels = [src.pop(f"{attn}{p}/kernel") for p in ("query", "key", "value")]
            biases = [src.pop(f"{attn}{p}/bias") for p in ("query", "key", "value")]
            d = kernels[0].shape[0]
            # [D, heads, head_dim] each -> [D, 3 * D] ordered [3, heads, head_dim]: timm's qkv.
            out[f"{t}attn.qkv.weight"] = np.concatenate([k.reshape(d, -1) for k in kernels], 1).T
            out[f"{t}attn.qkv.bias"] = np.concatenate([x.reshape(-1) for x in biases])
        if f"{attn}out/kernel" in src:
            k = src.pop(f"{attn}out/kernel")
            out[f"{t}attn.proj.weight"] = k.reshape(-1, k.shape[-1]).T
        if f"{attn}out/bias" in src:
            out[f"{t}attn.proj.bias"] = src.pop(f"{attn}out/bias")
        for dense, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            if f"{b}MlpBlock_0/{dense}/kernel" in src:
                out[f"{t}mlp.{name}.weight"] = src.pop(f"{b}MlpBlock_0/{dense}/kernel").T
            if f"{b}MlpBlock_0/{dense}/bias" in src:
                out[f"{t}mlp.{name}.bias"] = src.pop(f"{b}MlpBlock_0/{dense}/bias")
    for k in [k for k in src if k.startswith("head/")]:
        out["head." + k[len("head/") :]] = src.pop(k)  # dropped below with timm's heads
    out.update(src)  # unknown names, unmatched later
    return out


def timm_resnet_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's (and torchvision's) ResNet names -> the exporter's: bnN -> normN, downsample.0/1
    -> downsample_conv/_norm. The exporter's own names pass unchanged."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(^|\.)bn(\d)\.", r"\1norm\2.", k)
        k = k.replace(".downsample.0.", ".downsample_conv.").replace(
            ".downsample.1.", ".downsample_norm."
        )
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Adapting tensors


def reduce_stem(w: np.ndarray, channels: int, mode: str) -> np.ndarray:
    """A torch-layout stem kernel [out, C, *k] -> [out, channels, *k] (channels must be 1)."""
    if w.shape[1] == channels:
        return w
    if channels != 1:
        raise ValueError(f"cannot adapt a {w.shape[1]}-channel stem to {channels} channels")
    reduced = w.sum(axis=1, keepdims=True)
    return reduced / w.shape[1] if mode == "mean" else reduced


def pos_embed_prefix(n_tokens: int) -> tuple[int, tuple[int, int]]:
    """(class-token entries, square grid) of a checkpoint's position embeddings."""
    for prefix in (0, 1):
        g = math.isqrt(n_tokens - prefix)
        if n_tokens - prefix > 0 and g * g == n_tokens - prefix:
            return prefix, (g, g)
    raise ValueError(f"{n_tokens} position embeddings are neither a square grid nor one plus a "
                     "square grid")  # fmt: skip


def resample_pos_embed(pe: np.ndarray, grid: tuple[int, int], prefix: int) -> np.ndarray:
    """[1, p + g*g, D] -> [1, prefix + grid[0]*grid[1], D], bicubic with antialiasing over the
    patch grid (torch's F.interpolate(mode="bicubic", antialias=True), which timm's
    `resample_abs_pos_embed` uses; jax.image.resize's "cubic" computes the same, to 1e-6). A
    missing class-token entry is zero (the model then adds nothing to its class token, as the
    checkpoint did); a class-token entry the model has no use for is dropped."""
    import jax
    import jax.numpy as jnp

    old_prefix, old_grid = pos_embed_prefix(pe.shape[1])
    cls, patches = pe[:, :old_prefix], pe[:, old_prefix:]
    d = pe.shape[-1]
    if tuple(old_grid) != tuple(grid):
        x = jnp.asarray(patches.reshape(1, *old_grid, d), jnp.float32)
        x = jax.image.resize(x, (1, *grid, d), method="cubic", antialias=True)
        patches = np.asarray(x).reshape(1, -1, d)
    if prefix == 0:
        return patches
    if old_prefix == 0:
        cls = np.zeros((1, 1, d), pe.dtype)
    return np.concatenate([cls, patches], axis=1)


# ---------------------------------------------------------------------------------------------
# Matching a checkpoint to the image encoder's variables


def architecture(module) -> dict:
    """The exporter's description of an image encoder module (`pgjax.export.architecture`)."""
    from pgjax.export.architecture import describe

    return describe({"image_encoder": module}, {})["image_encoder"]


def _leaf_shape(tree: dict, path: tuple) -> tuple | None:
    try:
        return tuple(convert._get(tree, path).shape)
    except KeyError:
        return None


def _shape(x) -> list[int]:
    return [int(s) for s in x]


def match(state: dict[str, np.ndarray], variables: dict, arch: dict, spec: InitSpec, *,
          layout: str, grid: tuple[int, ...] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Map a read checkpoint onto the image encoder's leaves.

    state: {name: array} as read; variables: the encoder's own {"params": ..., "batch_stats":
    ...} (only the shapes are read); arch: `architecture(module)`; layout: "timm" or
    "big_vision"; grid: the model's patch grid (ViT; None: square). Returns ({(collection,
    *leaf path): float32 array}, record); raises ValueError on a shape that does not fit, and,
    with spec.strict, on any unmatched parameter.
    """
    record: dict = {"layout": layout, "strict": spec.strict}
    state = _strip_common(state, "module.")  # torch DistributedDataParallel
    if layout == "big_vision":
        state = _strip_common(state, "params/")
    if spec.prefix:
        inside = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
        if not inside:
            raise ValueError(f"config field init.prefix: no checkpoint entry starts with "
                             f"{spec.prefix!r} (e.g. {sorted(state)[:5]})")  # fmt: skip
        record["outside_prefix"] = len(state) - len(inside)
        state = inside
    kind = arch["kind"]
    origin: dict[str, str] = {}  # renamed -> the checkpoint's own name, for the messages
    if layout == "big_vision":
        if kind != "vit":
            raise ValueError("a big_vision .npz holds a ViT; the model's image encoder is a "
                             f"{kind}")  # fmt: skip
        state = big_vision_to_timm(state)
        origin = {k: "head/" + k[len("head.") :] for k in state if k.startswith("head.")}
    elif kind == "resnet":
        renamed = timm_resnet_names(state)
        origin = dict(zip(renamed, state, strict=True))
        state = renamed

    def named(name: str) -> str:  # as the file names it (a missing one: as timm would)
        if name in origin:
            return origin[name]
        if kind == "resnet" and layout == "timm":
            name = re.sub(r"(^|\.)norm(\d)\.", r"\1bn\2.", name)
            return name.replace("downsample_conv", "downsample.0").replace(
                "downsample_norm", "downsample.1"
            )
        return name

    drop = [k for k in state if k.startswith(HEADS[kind]) or k.endswith("num_batches_tracked")]
    state = {k: v for k, v in state.items() if k not in set(drop)}
    record["dropped"] = sorted(named(k) for k in drop)
    rules = convert.vit(arch, torch="") if kind == "vit" else convert.resnet(arch, torch="")

    loaded: dict[tuple, np.ndarray] = {}
    missing, mismatched = [], []
    for r in rules:
        leaf = (r.flax[0], *r.flax[2:])  # the rules' paths name the part; `variables` do not
        want = _leaf_shape(variables, leaf)
        where = "/".join(r.flax[2:])
        if want is None:  # the rules and the module disagree: a pgjax bug, not the file's
            raise KeyError(f"the image encoder has no parameter {where}")
        if r.torch not in state:
            missing.append(f"{where} (checkpoint name {named(r.torch)})")
            continue
        x = state[r.torch]
        if r.torch in STEMS and x.ndim >= 3 and x.shape[1] != want[-2]:
            try:
                x = reduce_stem(x, want[-2], spec.stem)
            except ValueError as e:
                mismatched.append(f"{named(r.torch)}: {e}")
                continue
            record["stem"] = (f"{named(r.torch)}: {state[r.torch].shape[1]} input channels "
                              f"{'summed' if spec.stem == 'sum' else 'averaged'} into "
                              f"{want[-2]}")  # fmt: skip
        if r.torch == "pos_embed" and tuple(x.shape) != want:
            prefix = 1 if arch.get("pool", "cls") == "cls" else 0
            n = want[1] - prefix
            model_grid = tuple(grid) if grid is not None else (math.isqrt(n),) * 2
            if len(model_grid) != 2 or math.prod(model_grid) != n or x.ndim != 3:
                mismatched.append(f"pos_embed: checkpoint {_shape(x.shape)} vs model "
                                  f"{_shape(want)} (only 2D patch grids are "
                                  "resampled)")  # fmt: skip
                continue
            try:
                old_prefix, old_grid = pos_embed_prefix(x.shape[1])
            except ValueError as e:
                mismatched.append(f"pos_embed: {e}")
                continue
            x = resample_pos_embed(x, model_grid, prefix)
            record["pos_embed"] = (f"{old_grid[0]}x{old_grid[1]} grid (+{old_prefix} class) -> "
                                   f"{model_grid[0]}x{model_grid[1]} (+{prefix} class), bicubic, "
                                   "antialiased")  # fmt: skip
        y = convert._to_flax_layout(np.asarray(x, np.float32), r.kind)
        if tuple(y.shape) != want:
            mismatched.append(f"{where} (checkpoint name {named(r.torch)}): checkpoint "
                              f"{_shape(y.shape)} vs model {_shape(want)}")  # fmt: skip
            continue
        loaded[leaf] = np.ascontiguousarray(y)
    used = {r.torch for r in rules}
    extra = sorted(named(k) for k in state if k not in used)
    if mismatched:
        raise ValueError("checkpoint shapes do not fit the image encoder (shapes in the model's "
                         "layout): " + "; ".join(mismatched))  # fmt: skip
    if spec.strict and (missing or extra):
        parts = []
        if missing:
            parts.append(f"model parameters not in the checkpoint: {', '.join(missing)}")
        if extra:
            parts.append(f"checkpoint entries the model has no place for: {', '.join(extra)}")
        raise ValueError("checkpoint does not match the image encoder; "
                         + "; ".join(parts)
                         + " (set init.strict=False to load the rest and list these)")  # fmt: skip
    record.update(loaded=len(loaded), skipped_model=missing, skipped_checkpoint=extra)
    return loaded, record


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load(spec: InitSpec, variables: dict, module, *, grid=None) -> tuple[dict, dict]:
    """Read spec.path and match it to the image encoder `module` whose variables are given.

    Returns ({flax path: array}, record). The record names the file by its base name and
    content digest only (a full path can name a person or a site).
    """
    fmt = file_format(spec.path, spec.format)
    state = read_checkpoint(spec.path, fmt)
    arch = architecture(module)
    layout = "big_vision" if fmt == "big_vision" else "timm"
    loaded, record = match(state, variables, arch, spec, layout=layout, grid=grid)
    notes = []
    if layout == "big_vision" and arch["kind"] == "vit" and not arch.get("gelu_approximate"):
        notes.append(
            "big_vision ViTs use tanh GELU; this encoder uses exact GELU (set "
            "model.image_encoder_kw.gelu_approximate=True to compute as it was trained)"
        )
    record = {"file": spec.path.name, "sha256_16": file_digest(spec.path), "format": fmt,
              "stem_mode": spec.stem, "prefix": spec.prefix, **record, "notes": notes}  # fmt: skip
    return loaded, record


def patch_grid(module, image_shape) -> tuple[int, ...] | None:
    """The ViT's patch grid for images [B, *spatial, C]; None for a ResNet."""
    patch = getattr(module, "patch_size", None)
    if patch is None:
        return None
    spatial = tuple(image_shape[1:-1])
    return tuple(s // p for s, p in zip(spatial, tuple(patch), strict=True))


def replace(tree: dict, updates: dict, place=None) -> dict:
    """A copy of the nested dict `tree` with the leaves at `updates`' paths replaced; `place`
    (old leaf, new NumPy array) -> leaf puts them where the old ones lived."""
    out = dict(tree)
    for path, value in updates.items():
        node = out
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        old = node[path[-1]]
        value = value.astype(old.dtype)
        node[path[-1]] = place(old, value) if place is not None else value
    return out


def summary(record: dict) -> str:
    """One log line of a record (no paths)."""
    bits = [f"{record['loaded']} tensors from {record['file']} ({record['layout']})"]
    if record.get("stem"):
        bits.append(record["stem"])
    if record.get("pos_embed"):
        bits.append(f"pos_embed {record['pos_embed']}")
    if record["dropped"]:
        bits.append(f"dropped {', '.join(record['dropped'])}")
    for key, what in (("skipped_model", "left at random init"),
                      ("skipped_checkpoint", "checkpoint entries skipped")):  # fmt: skip
        if record.get(key):
            bits.append(f"{what} (init.strict=False): {', '.join(record[key])}")
    bits += record.get("notes", [])
    return "; ".join(bits)


def load_part(spec: InitSpec, variables: dict, module, *, grid=None, place=None,
              part: str = "image_encoder") -> tuple[dict, dict]:  # fmt: skip
    """`load` into a whole model's variables {"params": {part: ...}, "batch_stats": {part:
    ...}, ...}: returns (variables with the part's leaves replaced, record)."""
    own = {col: tree[part] for col, tree in variables.items() if part in tree}
    loaded, record = load(spec, own, module, grid=grid)
    updates = {(path[0], part, *path[1:]): x for path, x in loaded.items()}
    return replace(variables, updates, place), record


def initialise_state(state: dict, config, objective, example_batch, workdir: Path | None,
                     log=print) -> dict:  # fmt: skip
    """The train state with its image encoder loaded from config.init.from (unchanged without
    one), each new leaf placed with its old leaf's sharding. The record goes to
    WORKDIR/init_from.json (process 0) and one log line."""
    import jax

    spec = InitSpec.from_config(config)
    if spec is None:
        return state
    module = objective.parts["image_encoder"]

    def place(old, value):
        return jax.make_array_from_callback(value.shape, old.sharding, lambda idx: value[idx])

    variables, record = load_part(
        spec, {"params": state["params"], **state["model_state"]}, module,
        grid=patch_grid(module, example_batch["image"].shape), place=place,
    )  # fmt: skip
    state = {**state, "params": variables.pop("params"), "model_state": variables}
    log(f"[init] {summary(record)}")
    if workdir is not None and jax.process_index() == 0:
        (Path(workdir) / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return state
