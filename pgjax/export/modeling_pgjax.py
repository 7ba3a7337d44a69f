"""PyTorch modules of a pgjax export. Self-contained: needs only torch and numpy.

`pgjax export` copies this file into its output folder, beside `model.safetensors` and
`config.json`. The modules mirror pgjax's Flax models (pgjax/models/) one to one: pre-norm
transformer blocks with timm's parameter names and LayerNorm epsilon 1e-6, exact or tanh GELU as
the Flax side was configured, attention through `scaled_dot_product_attention`, and ResNets with
torch's symmetric padding and BatchNorm running statistics.

    from modeling_pgjax import from_pretrained
    model = from_pretrained("OUT")
    z = model.embed_images(images)          # float32 [B, D]; images [B, H, W] (or [B, D, H, W])
    p = model.embed_protocol(tokens, values, value_mask)   # float32 [B, W]

Images are floats in [0, 1], or the store's uint8/uint16 pixels (scaled by 255 or 65535 as in
training). Protocol inputs are the store's token ids, z-scored values and value mask.

Where the export has them (NumPy computations, float64, the same as `pgjax.inference`):

    n = model.protocol_novelty(tokens, values, value_mask)   # OUT/protocol_stats.npz
    n["novelty"]    Mahalanobis distance of the protocol embedding from the training split's
                    (NaN for a model without a protocol encoder); compare with
                    model.protocol_stats["train_quantiles"]
    n["unusual"]    per item, ["Field=value (unseen|rare)", ...]: token strings of the vocabulary
    p = model.predict_proba(images, tokens, values, value_mask)   # OUT/calibration.json
                    the evaluation's linear probe, with its fitted calibration (temperature, or
                    one per vendor x scanner-model group); calibrated=False gives the raw probe
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPSILON = 1e-6  # pgjax.models.layers.LN_EPSILON (timm's ViT)
NORM_EPSILON = 1e-5  # BatchNorm / GroupNorm in pgjax.models.resnet
EXPORT_FORMAT = "pgjax-export"
EXPORT_VERSION = 1


def _gelu(approximate: bool) -> nn.Module:
    # Flax's nn.gelu defaults to the tanh approximation, torch's to the exact erf: the export
    # records which one the Flax model used.
    return nn.GELU(approximate="tanh" if approximate else "none")


# ---------------------------------------------------------------------------------------------
# Transformer pieces (timm's names: attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, key_mask=None):
        b, t, w = x.shape
        # [B, T, 3, heads, head_dim]: the fused layout of the Flax (and timm) qkv projection.
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, w // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, t, w))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, gelu_approximate: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = _gelu(gelu_approximate)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, gelu_approximate: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPSILON)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPSILON)
        self.mlp = Mlp(width, mlp_dim, gelu_approximate)

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# Image encoders


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, width: int, in_chans: int = 1):
        super().__init__()
        conv = nn.Conv2d if len(patch_size) == 2 else nn.Conv3d
        self.proj = conv(in_chans, width, tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x):
        # [B, C, *grid] -> [B, T, C], row-major over the patch grid (the Flax reshape order).
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT over [B, C, H, W] images or, with a 3-entry patch size, [B, C, D, H, W] volumes."""

    def __init__(self, *, width, depth, num_heads, mlp_dim, patch_size, input_shape, pool="cls",
                 gelu_approximate=False, in_chans=1, **_):  # fmt: skip
        super().__init__()
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', not {pool!r}")
        self.patch_size = tuple(patch_size)
        self.input_shape = tuple(input_shape)
        num_patches = math.prod(s // p for s, p in zip(input_shape, patch_size, strict=True))
        self.prefix = 1 if pool == "cls" else 0
        self.patch_embed = PatchEmbed(self.patch_size, width, in_chans)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + num_patches, width))
        self.blocks = nn.Sequential(
            *[Block(width, num_heads, mlp_dim, gelu_approximate) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width, eps=LN_EPSILON)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])}: this ViT was trained on "
                f"{self.input_shape} (its position embeddings are sized for it)"
            )
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, self.prefix :]
        if self.prefix:
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        tokens = x[:, self.prefix :]
        pooled = x[:, 0] if self.prefix else tokens.mean(dim=1)
        return {"pooled": pooled, "tokens": tokens}


def _norm(kind: str, channels: int, nd: int, groups: int) -> nn.Module:
    if kind == "batch":
        bn = nn.BatchNorm2d if nd == 2 else nn.BatchNorm3d
        return bn(channels, eps=NORM_EPSILON)
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=NORM_EPSILON)


def _conv(nd, cin, cout, kernel, stride):
    conv = nn.Conv2d if nd == 2 else nn.Conv3d
    # Symmetric padding, as the Flax ResNet uses (not SAME, which pads asymmetrically).
    return conv(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, nd, cin, features, stride, norm):
        super().__init__()
        self.conv1 = _conv(nd, cin, features, 3, stride)
        self.norm1 = norm(features)
        self.conv2 = _conv(nd, features, features, 3, 1)
        self.norm2 = norm(features)
        self.has_downsample = stride != 1 or cin != features
        if self.has_downsample:
            self.downsample_conv = _conv(nd, cin, features, 1, stride)
            self.downsample_norm = norm(features)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.has_downsample:
            x = self.downsample_norm(self.downsample_conv(x))
        return F.relu(x + y)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, nd, cin, features, stride, norm):
        super().__init__()
        out = features * 4
        self.conv1 = _conv(nd, cin, features, 1, 1)
        self.norm1 = norm(features)
        self.conv2 = _conv(nd, features, features, 3, stride)
        self.norm2 = norm(features)
        self.conv3 = _conv(nd, features, out, 1, 1)
        self.norm3 = norm(out)
        self.has_downsample = stride != 1 or cin != out
        if self.has_downsample:
            self.downsample_conv = _conv(nd, cin, out, 1, stride)
            self.downsample_norm = norm(out)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        if self.has_downsample:
            x = self.downsample_norm(self.downsample_conv(x))
        return F.relu(x + y)


class ResNet(nn.Module):
    """ResNet without classifier (torchvision v1.5: stride on the 3x3 conv), 2D or 3D."""

    def __init__(self, *, stage_sizes, block, width, input_shape, norm="batch",
                 group_norm_groups=32, in_chans=1, **_):  # fmt: skip
        super().__init__()
        nd = len(input_shape)
        self.input_shape = tuple(input_shape)
        make_norm = lambda c: _norm(norm, c, nd, group_norm_groups)  # noqa: E731
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = _conv(nd, in_chans, width, 7, 2)
        self.norm1 = make_norm(width)
        self.pool = (nn.MaxPool2d if nd == 2 else nn.MaxPool3d)(3, stride=2, padding=1)
        cin = width
        for s, n_blocks in enumerate(stage_sizes):
            blocks = []
            for i in range(n_blocks):
                features = width * 2**s
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(block_cls(nd, cin, features, stride, make_norm))
                cin = features * block_cls.expansion
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)

    def forward(self, x):
        x = self.pool(F.relu(self.norm1(self.conv1(x))))
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return {
            "pooled": x.flatten(2).mean(dim=2),
            "tokens": x.flatten(2).transpose(1, 2),
            "feature_map": x,
        }


# ---------------------------------------------------------------------------------------------
# Protocol encoder and projection heads


class ProtocolEncoder(nn.Module):
    """Transformer over the F header fields: field + token + gated numeric-value embeddings,
    a summary (cls) token first; fields holding `pad_id` are not attended to."""

    def __init__(self, *, num_fields, vocab_size, width, depth, num_heads, mlp_dim, pad_id=0,
                 gelu_approximate=False, **_):  # fmt: skip
        super().__init__()
        self.num_fields, self.pad_id = num_fields, pad_id
        self.token_embed = nn.Embedding(vocab_size, width)
        self.field_embed = nn.Parameter(torch.zeros(num_fields, width))
        self.value_kernel = nn.Parameter(torch.zeros(num_fields, width))
        self.value_bias = nn.Parameter(torch.zeros(num_fields, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(
            [Block(width, num_heads, mlp_dim, gelu_approximate) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width, eps=LN_EPSILON)

    def forward(self, tokens, values, value_mask):
        b, f = tokens.shape
        if f != self.num_fields:
            raise ValueError(f"expected {self.num_fields} protocol fields, got {f}")
        present = (value_mask > 0).unsqueeze(-1)
        v = torch.where(present, values.unsqueeze(-1), torch.zeros((), dtype=values.dtype))
        x = self.token_embed(tokens) + self.field_embed
        x = x + torch.where(present, v * self.value_kernel + self.value_bias, 0.0)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        key_mask = None
        if self.pad_id is not None:
            keep = tokens != self.pad_id
            key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool), keep], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x)
        return {"pooled": x[:, 0], "fields": x[:, 1:]}


class ProjectionHead(nn.Module):
    """Linear projection (or fc1-act-fc2 MLP) to the contrastive space, L2-normalised."""

    def __init__(self, *, in_dim, embed_dim, hidden_dim=None, activation="relu", normalize=True,
                 **_):  # fmt: skip
        super().__init__()
        self.normalize = normalize
        if hidden_dim is None:
            self.proj = nn.Linear(in_dim, embed_dim)
            self.mlp = False
        else:
            self.fc1 = nn.Linear(in_dim, hidden_dim)
            self.act = nn.ReLU() if activation == "relu" else nn.GELU()
            self.fc2 = nn.Linear(hidden_dim, embed_dim)
            self.mlp = True

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(x))) if self.mlp else self.proj(x)
        if self.normalize:
            x = x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-12)
        return x


# ---------------------------------------------------------------------------------------------
# The exported model


def build_image_encoder(arch: dict, input_shape) -> nn.Module:
    kind = arch["kind"]
    if kind == "vit":
        return VisionTransformer(input_shape=input_shape, **arch)
    if kind == "resnet":
        return ResNet(input_shape=input_shape, **arch)
    raise ValueError(f"unknown image encoder kind {kind!r}")


class PgjaxModel(nn.Module):
    """The image encoder, the protocol encoder and the projection heads of one export.

    `embed_images` / `embed_protocol` return the pooled encoder features (what
    `pgjax.inference.load(...).embed_images` returns on the JAX side); `project_images` /
    `project_protocol` the L2-normalised contrastive embeddings, where the model has them.
    """

    def __init__(self, config: dict):
        super().__init__()
        if config.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a pgjax export config (format={config.get('format')!r})")
        if config.get("version") != EXPORT_VERSION:
            raise ValueError(
                f"export version {config.get('version')}; this modeling file reads "
                f"version {EXPORT_VERSION}"
            )
        self.config = config
        arch = config["architecture"]
        self.input_shape = tuple(config["input"]["shape"])
        self.image_encoder = build_image_encoder(arch["image_encoder"], self.input_shape)
        parts = ("protocol_encoder", "image_proj", "protocol_proj")
        for name in parts:
            setattr(self, name, None)
        if arch.get("protocol_encoder"):
            self.protocol_encoder = ProtocolEncoder(**arch["protocol_encoder"])
        for name in ("image_proj", "protocol_proj"):
            if arch.get(name):
                setattr(self, name, ProjectionHead(**arch[name]))

    # Inputs ---------------------------------------------------------------------------------

    def image_tensor(self, images) -> torch.Tensor:
        """[B, *spatial] (or [B, *spatial, 1]) floats in [0, 1] or store integers ->
        float32 [B, 1, *spatial]."""
        x = np.asarray(images) if not isinstance(images, torch.Tensor) else images
        if isinstance(x, np.ndarray):
            if x.dtype in (np.uint8, np.uint16):
                x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 65535.0)
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        elif x.dtype == torch.uint8:
            x = x.float() / 255.0
        nd = len(self.input_shape)
        if x.ndim == nd + 2 and x.shape[-1] == 1:  # the JAX layout [B, *spatial, 1]
            x = x[..., 0]
        if x.ndim != nd + 1:
            raise ValueError(
                f"images must be [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}"
            )
        return x.to(torch.float32).unsqueeze(1)

    def protocol_tensors(self, tokens, values=None, value_mask=None):
        if isinstance(tokens, dict):
            tokens, values, value_mask = (tokens["tokens"], tokens.get("values"),
                                          tokens.get("value_mask"))  # fmt: skip
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
        zeros = np.zeros(tuple(tokens.shape), np.float32)
        values = torch.as_tensor(np.asarray(zeros if values is None else values, np.float32))
        mask = zeros if value_mask is None else value_mask
        value_mask = torch.as_tensor(np.asarray(mask, np.float32))
        return tokens, values, value_mask

    # Outputs --------------------------------------------------------------------------------

    def forward(self, images):
        return self.image_encoder(images)

    @torch.inference_mode()
    def embed_images(self, images) -> np.ndarray:
        return self.image_encoder(self.image_tensor(images))["pooled"].numpy()

    @torch.inference_mode()
    def project_images(self, images) -> np.ndarray:
        if self.image_proj is None:
            raise ValueError("this model has no image projection (no contrastive term)")
        pooled = self.image_encoder(self.image_tensor(images))["pooled"]
        return self.image_proj(pooled).numpy()

    def _protocol(self, tokens, values, value_mask):
        if self.protocol_encoder is None:
            raise ValueError("this model has no protocol encoder")
        return self.protocol_encoder(*self.protocol_tensors(tokens, values, value_mask))

    @torch.inference_mode()
    def embed_protocol(self, tokens, values=None, value_mask=None) -> np.ndarray:
        return self._protocol(tokens, values, value_mask)["pooled"].numpy()

    @torch.inference_mode()
    def project_protocol(self, tokens, values=None, value_mask=None) -> np.ndarray:
        if self.protocol_proj is None:
            raise ValueError("this model has no protocol projection (no contrastive term)")
        return self.protocol_proj(self._protocol(tokens, values, value_mask)["pooled"]).numpy()


    # Protocol novelty and calibrated probabilities ---------------------------------------

    protocol_stats = None  # from OUT/protocol_stats.npz (from_pretrained)
    calibration = None  # from OUT/calibration.json

    def novelty_from_embedding(self, protocol_embedding) -> np.ndarray:
        """Mahalanobis distance [B] of pooled protocol embeddings [B, W] (float64)."""
        stats = self._stats()
        if "mean" not in stats:
            return np.full(len(protocol_embedding), np.nan)
        d = np.asarray(protocol_embedding, np.float64) - stats["mean"]
        return np.sqrt(np.maximum(np.einsum("nw,wv,nv->n", d, stats["precision"], d), 0.0))

    def unusual_values(self, tokens) -> list:
        """Per item, "Field=value (unseen|rare)" for fields whose token is unseen on the
        training split or held by fewer than rare_fraction of its items."""
        stats = self._stats()
        tokens = np.asarray(tokens, np.int64)
        fields, names, counts = stats["fields"], stats["token_names"], stats["token_counts"]
        if tokens.ndim != 2 or tokens.shape[1] != len(fields):
            raise ValueError(f"tokens must be [B, {len(fields)}], got {tokens.shape}")
        seen = counts[np.arange(len(fields))[None, :], tokens]
        rare = (seen < stats["rare_fraction"] * stats["n_items"]) & (tokens != 0)  # 0: PAD
        return [[f"{fields[f]}={names[tokens[k, f]]} ({'unseen' if seen[k, f] == 0 else 'rare'})"
                 for f in np.flatnonzero(rare[k])] for k in range(len(tokens))]  # fmt: skip

    def protocol_novelty(self, tokens, values=None, value_mask=None) -> dict:
        """{"novelty": float64 [B], "unusual": [[str]]} of protocol inputs."""
        if isinstance(tokens, dict):
            tokens, values, value_mask = (tokens["tokens"], tokens.get("values"),
                                          tokens.get("value_mask"))  # fmt: skip
        if self.protocol_encoder is not None and "mean" in self._stats():
            novelty = self.novelty_from_embedding(self.embed_protocol(tokens, values, value_mask))
        else:
            novelty = np.full(len(np.asarray(tokens)), np.nan)
        return {"novelty": novelty, "unusual": self.unusual_values(tokens)}

    def _stats(self) -> dict:
        if self.protocol_stats is None:
            raise ValueError("this export has no protocol statistics (protocol_stats.npz)")
        return self.protocol_stats

    def calibrated_proba(self, image_embedding, protocol_embedding=None, tokens=None,
                         calibrated: bool = True) -> np.ndarray:  # fmt: skip
        """The probe's probabilities [B] (float64) from pooled embeddings; with `calibrated`,
        its logits divided by the fitted temperature of each item's group (from its tokens)."""
        rec = self.calibration
        if rec is None:
            raise ValueError("this export carries no probe (export with --calibration FILE)")
        parts = {"image": image_embedding, "protocol": protocol_embedding}
        missing = [k for k in rec["inputs"] if parts[k] is None]
        if missing:
            raise ValueError(f"the probe reads {rec['inputs']}; missing {missing}")
        x = np.concatenate([np.asarray(parts[k], np.float64) for k in rec["inputs"]], axis=1)
        probe = rec["probe"]
        z = ((x - np.asarray(probe["mean"])) / np.asarray(probe["scale"])) @ np.asarray(
            probe["w"]) + probe["b"]  # fmt: skip
        t = np.ones(len(z))
        cal = rec["calibration"]
        if calibrated:
            t = t * float(cal["temperature"])
            if cal["method"] == "protocol":
                if tokens is None:
                    raise ValueError("protocol calibration needs the items' tokens")
                tokens = np.asarray(tokens, np.int64)[:, rec["group_columns"]]
                groups = cal.get("groups", {})
                for k, row in enumerate(tokens):
                    key = ",".join(str(int(v)) for v in row)
                    if key in groups:
                        t[k] = float(groups[key]["temperature"])
        return 0.5 * (1.0 + np.tanh(0.5 * z / t))  # the logistic function, without overflow

    def predict_proba(self, images, tokens=None, values=None, value_mask=None,
                      calibrated: bool = True) -> np.ndarray:  # fmt: skip
        """The exported probe's (calibrated) probability of the finding, per item."""
        rec = self.calibration
        if rec is None:
            raise ValueError("this export carries no probe (export with --calibration FILE)")
        image = self.embed_images(images)
        protocol = None
        if "protocol" in rec["inputs"]:
            protocol = self.embed_protocol(tokens, values, value_mask)
        return self.calibrated_proba(image, protocol, tokens, calibrated)


# ---------------------------------------------------------------------------------------------
# Loading

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8}  # fmt: skip


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """A .safetensors file as tensors (the format: 8-byte header size, JSON header, data)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        arr = np.frombuffer(data[start:stop], dtype=_ST_DTYPES[info["dtype"]])
        out[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return out


def load_protocol_stats(path) -> dict:
    """OUT/protocol_stats.npz as a dict of arrays and numbers (NumPy, no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        out = {k: z[k] for k in z.files if k != "meta"}
    out["fields"] = [str(f) for f in out["fields"]]
    out["token_names"] = [str(t) for t in out["token_names"]]
    out.update({k: meta[k] for k in ("n_items", "rare_fraction", "train_quantiles")})
    return out


def from_pretrained(path, weights: str = "model.safetensors") -> PgjaxModel:
    """The model of an export folder, in eval mode (BatchNorm uses its running statistics),
    with its protocol statistics and calibrated probe where the folder has them."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = PgjaxModel(config)
    model.load_state_dict(load_safetensors(os.path.join(path, weights)), strict=True)
    stats = os.path.join(path, "protocol_stats.npz")
    if os.path.exists(stats):
        model.protocol_stats = load_protocol_stats(stats)
    calibration = os.path.join(path, "calibration.json")
    if os.path.exists(calibration):
        with open(calibration) as f:
            model.calibration = json.load(f)
    return model.eval()
