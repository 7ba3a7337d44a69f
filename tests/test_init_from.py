"""Initialising the image encoder from published weights (pgjax/train/init_from.py).

Every checkpoint is written here, by torch or NumPy, from a known model: a timm-layout ViT and
ResNet (timm's own model where timm imports, otherwise pgjax's exported torch modules, whose
names are timm's; the ResNet saved under timm's names) and a big_vision-layout ViT .npz. The
Flax encoder loaded from each must compute the torch model's features (before any head) to
1e-4, with the RGB stem fed a grey image repeated over its 3 channels; a checkpoint that does
not fit must fail naming the parameter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgjax.export import modeling_pgjax as tm
from pgjax.models import ResNet, ViT
from pgjax.train import init_from

REPO = Path(__file__).resolve().parents[1]
VIT = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def torch_vit(input_shape=(16, 16), patch=(4, 4), pool="cls", gelu_approximate=False,
              seed=0, **kw):  # fmt: skip
    """A 3-channel torch ViT with every parameter random (zeros would hide a misplaced one)."""
    torch.manual_seed(seed)
    m = tm.VisionTransformer(**{**VIT, **kw}, patch_size=patch, input_shape=input_shape,
                             pool=pool, gelu_approximate=gelu_approximate, in_chans=3)  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


def torch_resnet(seed=0):
    """A 3-channel bottleneck ResNet with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    m = tm.ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, input_shape=(32, 32),
                  in_chans=3)  # fmt: skip
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.3)
    return m.eval()


def as_timm_resnet(state: dict) -> dict:
    """pgjax's exported ResNet names -> timm's (conv1/bn1, layerS.I.bnN, downsample.0/.1)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(^|\.)norm(\d)\.", r"\1bn\2.", k)
        k = k.replace("downsample_conv", "downsample.0").replace("downsample_norm", "downsample.1")
        out[k] = v
    return out


def grey(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def torch_features(model, x: np.ndarray) -> np.ndarray:
    """The torch model's pooled features for grey images [B, *spatial], fed as RGB."""
    with torch.no_grad():
        rgb = torch.from_numpy(x)[:, None].repeat(1, 3, *([1] * (x.ndim - 1)))
        return model(rgb)["pooled"].numpy()


def flax_init(module, x: np.ndarray) -> dict:
    v = module.init(jax.random.key(0), x[..., None])
    return jax.tree.map(np.asarray, dict(v))


def flax_features(module, variables, x: np.ndarray) -> np.ndarray:
    return np.asarray(module.apply(variables, x[..., None])["pooled"])


def load(path, module, x, **spec_kw):
    variables = flax_init(module, x)
    spec = init_from.InitSpec(Path(path), **spec_kw)
    grid = init_from.patch_grid(module, x[..., None].shape)
    loaded, record = init_from.load(spec, variables, module, grid=grid)
    return init_from.replace(variables, loaded), record, variables


def with_head(state: dict, width: int, name="head") -> dict:
    g = torch.Generator().manual_seed(5)
    return {**state, f"{name}.weight": torch.randn(7, width, generator=g),
            f"{name}.bias": torch.randn(7, generator=g)}  # fmt: skip


def save_safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# timm layout


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_loads_and_matches_torch(tmp_path, suffix):
    ref = torch_vit()
    state = with_head(ref.state_dict(), VIT["width"])
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training script's wrapper
    else:
        save_safetensors(state, path)
    x = grey((3, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4))
    variables, record, fresh = load(path, module, x)
    got = flax_features(module, variables, x)
    np.testing.assert_allclose(got, torch_features(ref, x), atol=1e-4, rtol=0)
    assert np.abs(flax_features(module, fresh, x) - got).max() > 1e-2  # the load changed it
    assert record["dropped"] == ["head.bias", "head.weight"]
    assert record["stem"] == "patch_embed.proj.weight: 3 input channels summed into 1"
    assert record["skipped_model"] == record["skipped_checkpoint"] == []
    assert record["format"] == ("torch" if suffix == ".pth" else "safetensors")


def test_stem_mean_is_the_rgb_output_on_a_third_of_the_grey_image(tmp_path):
    ref = torch_vit()
    path = save_safetensors(ref.state_dict(), tmp_path / "vit.safetensors")
    x = grey((2, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4))
    variables, record, _ = load(path, module, x, stem="mean")
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(ref, x / 3),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert "averaged" in record["stem"]


@pytest.mark.parametrize("grid", [(6, 6), (3, 5)])
def test_position_embeddings_resampled_as_timm_does(tmp_path, grid):
    """A 4x4-grid checkpoint into a model on another grid: the reference is the torch model
    with its embeddings resampled the way timm's resample_abs_pos_embed does (class entry
    apart, F.interpolate bicubic with antialiasing)."""
    ref = torch_vit()
    path = save_safetensors(ref.state_dict(), tmp_path / "vit.safetensors")
    shape = (grid[0] * 4, grid[1] * 4)
    big = torch_vit(input_shape=shape)
    state = dict(ref.state_dict())
    pe = state["pos_embed"]
    patches = pe[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    state["pos_embed"] = torch.cat([pe[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, 32)], 1)
    big.load_state_dict(state)
    x = grey((2, *shape))
    module = ViT(**VIT, patch_size=(4, 4))
    variables, record, _ = load(path, module, x)
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(big, x),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert record["pos_embed"].startswith(f"4x4 grid (+1 class) -> {grid[0]}x{grid[1]}")


def test_timm_resnet_loads_and_matches_torch(tmp_path):
    ref = torch_resnet()
    state = with_head(as_timm_resnet(ref.state_dict()), 32, name="fc")
    # timm's ResNet names (timm/models/resnet.py: bn1, layerS.I.bnN, downsample Sequential).
    for name in ("conv1.weight", "bn1.running_var", "layer1.0.bn3.weight",
                 "layer1.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                 "fc.weight", "bn1.num_batches_tracked"):  # fmt: skip
        assert name in state
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    x = grey((3, 32, 32))
    module = ResNet(stage_sizes=(1, 1), block="bottleneck", width=8)
    variables, record, _ = load(path, module, x)
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(ref, x),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(record["dropped"])
    assert record["stem"] == "conv1.weight: 3 input channels summed into 1"


def test_resnet_mismatches_use_the_files_names(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(as_timm_resnet(torch_resnet().state_dict()), path)
    x = grey((1, 32, 32))
    deeper = ResNet(stage_sizes=(1, 1, 1), block="bottleneck", width=8)
    with pytest.raises(ValueError, match=r"layer3_0/norm1/scale \(checkpoint name "
                       r"layer3\.0\.bn1\.weight\)"):  # fmt: skip
        load(path, deeper, x)
    wider = ResNet(stage_sizes=(1, 1), block="bottleneck", width=16)
    with pytest.raises(ValueError, match=r"norm1/scale \(checkpoint name bn1\.weight\): "
                       r"checkpoint \[8\] vs model \[16\]"):  # fmt: skip
        load(path, wider, x)


def test_real_timm_models_load_and_match(tmp_path):
    """Where timm imports: its own VisionTransformer and ResNet-18 (pretrained=False) written
    by torch. (Run by hand with timm 1.0.31 and tools/check_timm_layout.py's import stubs: both
    agree to 2e-7.)"""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                              patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                              num_classes=5).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = save_safetensors(model.state_dict(), tmp_path / "timm_vit.safetensors")
    x = grey((3, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4))
    variables, record, _ = load(path, module, x)
    with torch.no_grad():
        rgb = torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)
        want = model.forward_head(model.forward_features(rgb), pre_logits=True).numpy()
    np.testing.assert_allclose(flax_features(module, variables, x), want, atol=1e-4, rtol=0)
    assert record["dropped"] == ["head.bias", "head.weight"]

    # timm's ResNet-18, its BatchNorm statistics random too.
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for name, t in resnet.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.05)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    x = grey((2, 32, 32))
    module = ResNet(stage_sizes=(2, 2, 2, 2), block="basic", width=64)
    variables, record, _ = load(tmp_path / "resnet18.pth", module, x)
    with torch.no_grad():
        rgb = torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)
        want = resnet.forward_head(resnet.forward_features(rgb), pre_logits=True).numpy()
    np.testing.assert_allclose(flax_features(module, variables, x), want, atol=1e-4, rtol=0)
    assert record["dropped"] == ["bn1.num_batches_tracked", "fc.bias", "fc.weight"] + [
        f"layer{s}.{i}.{bn}.num_batches_tracked" for s in range(1, 5) for i in range(2)
        for bn in ("bn1", "bn2", *(("downsample.1",) if s > 1 and i == 0 else ()))
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# big_vision layout


def big_vision_npz(ref, path: Path, *, legacy: bool = False) -> Path:
    """The torch ViT's weights in big_vision's names and Flax layouts, written with NumPy.
    legacy: the pre-2022 layout (position embeddings under Transformer/posembed_input with
    the class entry folded in) and a scanned encoder (blocks stacked on a leading axis)."""
    s = {k: v.numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    d, heads = VIT["width"], VIT["num_heads"]
    out = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
        "head/kernel": np.ones((d, 5), np.float32),
        "head/bias": np.zeros(5, np.float32),
    }
    cls = "cls_token" in s
    pe = s["pos_embed"]
    if cls:
        assert np.all(pe[:, :1] == 0)  # big_vision adds no position to its class token
        out["cls"] = s["cls_token"]
        pe = pe[:, 1:]
    out["pos_embedding"] = pe
    blocks = []
    for i in range(VIT["depth"]):
        t = f"blocks.{i}."
        qkv_w = s[t + "attn.qkv.weight"].T.reshape(d, 3, heads, d // heads)
        qkv_b = s[t + "attn.qkv.bias"].reshape(3, heads, d // heads)
        b = {"LayerNorm_0/scale": s[t + "norm1.weight"], "LayerNorm_0/bias": s[t + "norm1.bias"],
             "LayerNorm_1/scale": s[t + "norm2.weight"], "LayerNorm_1/bias": s[t + "norm2.bias"],
             "MultiHeadDotProductAttention_0/out/kernel":
                 s[t + "attn.proj.weight"].T.reshape(heads, d // heads, d),
             "MultiHeadDotProductAttention_0/out/bias": s[t + "attn.proj.bias"],
             "MlpBlock_0/Dense_0/kernel": s[t + "mlp.fc1.weight"].T,
             "MlpBlock_0/Dense_0/bias": s[t + "mlp.fc1.bias"],
             "MlpBlock_0/Dense_1/kernel": s[t + "mlp.fc2.weight"].T,
             "MlpBlock_0/Dense_1/bias": s[t + "mlp.fc2.bias"]}  # fmt: skip
        for j, name in enumerate(("query", "key", "value")):
            b[f"MultiHeadDotProductAttention_0/{name}/kernel"] = qkv_w[:, j]
            b[f"MultiHeadDotProductAttention_0/{name}/bias"] = qkv_b[j]
        blocks.append(b)
    if legacy:
        for k in blocks[0]:
            out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
        # Old checkpoints: [cls entry, patches] under Transformer/, the class token without it.
        shift = np.random.default_rng(4).normal(size=(1, 1, d)).astype(np.float32)
        out["Transformer/posembed_input/pos_embedding"] = np.concatenate(
            [shift, out.pop("pos_embedding")], axis=1
        )
        out["cls"] = out["cls"] - shift
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    np.savez(path, **out)
    return path


@pytest.mark.parametrize("variant", ["tok", "gap", "legacy"])
def test_big_vision_vit_loads_and_matches_torch(tmp_path, variant):
    pool = "gap" if variant == "gap" else "cls"
    ref = torch_vit(pool=pool, gelu_approximate=True)  # big_vision's MLP: flax's tanh GELU
    if pool == "cls":
        with torch.no_grad():
            ref.pos_embed[:, :1] = 0
    path = big_vision_npz(ref, tmp_path / "bv.npz", legacy=variant == "legacy")
    x = grey((3, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4), pool=pool, gelu_approximate=True)
    variables, record, _ = load(path, module, x)
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(ref, x),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert record["layout"] == "big_vision" and record["dropped"] == ["head/bias", "head/kernel"]
    assert record["notes"] == []


def test_big_vision_into_exact_gelu_says_so(tmp_path):
    path = big_vision_npz(torch_vit(pool="gap"), tmp_path / "bv.npz")
    _, record, _ = load(path, ViT(**VIT, patch_size=(4, 4), pool="gap"), grey((1, 16, 16)))
    assert "tanh GELU" in record["notes"][0]
    assert "tanh GELU" in init_from.summary(record)


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    path = save_safetensors(torch_vit(width=48, num_heads=2).state_dict(), tmp_path / "w.st")
    with pytest.raises(ValueError) as e:
        load(path, ViT(**VIT, patch_size=(4, 4)), grey((1, 16, 16)), format="safetensors")
    msg = str(e.value)
    assert "patch_embed/kernel (checkpoint name patch_embed.proj.weight): checkpoint " \
        "[4, 4, 1, 48] vs model [4, 4, 1, 32]" in msg  # fmt: skip
    assert "blocks_0/attn/qkv/kernel" in msg


def test_unmatched_parameters_fail_by_name_unless_not_strict(tmp_path):
    deeper = torch_vit(depth=3)
    path = save_safetensors(deeper.state_dict(), tmp_path / "deep.safetensors")
    x = grey((2, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4))
    with pytest.raises(ValueError, match=r"checkpoint entries the model has no place for: "
                       r"blocks\.2\.attn\.proj\.bias, blocks\.2\.attn\.proj\.weight"):  # fmt: skip
        load(path, module, x)
    variables, record, _ = load(path, module, x, strict=False)
    assert len(record["skipped_checkpoint"]) == 12
    assert all(k.startswith("blocks.2.") for k in record["skipped_checkpoint"])
    # The first two blocks are the checkpoint's: a 2-block torch model with its weights agrees.
    shallow = torch_vit()
    shallow.load_state_dict({k: v for k, v in deeper.state_dict().items()
                             if not k.startswith("blocks.2.")})  # fmt: skip
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(shallow, x),
                               atol=1e-4, rtol=0)  # fmt: skip

    # The other way: the model's third block is not in the checkpoint.
    path = save_safetensors(torch_vit().state_dict(), tmp_path / "shallow.safetensors")
    module3 = ViT(**{**VIT, "depth": 3}, patch_size=(4, 4))
    with pytest.raises(
        ValueError,
        match=r"model parameters not in the checkpoint: "
        r"blocks_2/norm1/scale \(checkpoint name blocks\.2\.norm1\.weight\)",
    ):
        load(path, module3, x)
    variables, record, fresh = load(path, module3, x, strict=False)
    assert len(record["skipped_model"]) == 12
    kept = variables["params"]["blocks_2"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept),
               jax.tree.leaves(fresh["params"]["blocks_2"]), strict=True))  # fmt: skip
    assert "left at random init (init.strict=False): blocks_2/" in init_from.summary(record)


def test_a_resnet_checkpoint_into_a_vit_fails_naming_what_is_missing(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(as_timm_resnet(torch_resnet().state_dict()), path)
    with pytest.raises(ValueError, match="model parameters not in the checkpoint: patch_embed"):
        load(path, ViT(**VIT, patch_size=(4, 4)), grey((1, 16, 16)))
    with pytest.raises(ValueError, match="a big_vision .npz holds a ViT"):
        bv = big_vision_npz(torch_vit(pool="gap"), tmp_path / "bv.npz")
        load(bv, ResNet(stage_sizes=(1, 1), block="bottleneck", width=8), grey((1, 32, 32)))


def test_bad_files_and_fields_are_named(tmp_path):
    module, x = ViT(**VIT, patch_size=(4, 4)), grey((1, 16, 16))
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such checkpoint file"):
        load(tmp_path / "nope.safetensors", module, x)
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w.ckpt: cannot tell the checkpoint format"):
        load(tmp_path / "w.ckpt", module, x)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors"):
        load(tmp_path / "bad.safetensors", module, x)
    path = save_safetensors(torch_vit().state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="init.prefix: no checkpoint entry starts with 'visual.'"):
        load(path, module, x, prefix="visual.")

    import ml_collections

    from pgjax.train.defaults import base_config

    c = base_config()
    assert init_from.InitSpec.from_config(c) is None
    assert init_from.InitSpec.from_config(ml_collections.ConfigDict({"seed": 0})) is None
    c.init["from"], c.init.format = "w.safetensors", "onnx"
    with pytest.raises(ValueError, match="config field init.format: 'onnx'"):
        init_from.InitSpec.from_config(c)


def test_prefix_reads_a_sub_model(tmp_path):
    """An open_clip-style file: the image tower under visual.trunk., a text tower beside it."""
    ref = torch_vit()
    state = {f"visual.trunk.{k}": v for k, v in ref.state_dict().items()}
    state["text.token_embedding.weight"] = torch.zeros(10, 4)
    path = save_safetensors(state, tmp_path / "clip.safetensors")
    x = grey((2, 16, 16))
    module = ViT(**VIT, patch_size=(4, 4))
    variables, record, _ = load(path, module, x, prefix="visual.trunk.")
    np.testing.assert_allclose(flax_features(module, variables, x), torch_features(ref, x),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert record["outside_prefix"] == 1


# ---------------------------------------------------------------------------------------------
# Before pretraining: `pgjax train` with init.from


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from dicom_corpus import copy_with_identity
    from pydicom.data import get_testdata_file

    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("init_dicom")
    for n in range(16):
        src = get_testdata_file("CT_small.dcm" if n % 2 else "MR_small.dcm")
        copy_with_identity(src, root / "site_a" / f"{n:03d}.dcm", patient=n // 2, tag=f"t{n}",
                           study="s")  # fmt: skip
    out = tmp_path_factory.mktemp("init_store") / "store"
    cfg = PreprocessConfig(image_size=(32, 32), min_patients=2, split_fractions=(1.0, 0.0, 0.0))
    preprocess([root], out, cfg=cfg, workers=1)
    return out


def test_training_starts_from_the_checkpoint(store, tmp_path):
    """`pgjax train` with init.from: the state it starts from holds the imported encoder, and
    WORKDIR/init_from.json records the import. (max_steps=0: the state is created and
    returned, no step is compiled.)"""
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import train

    # vit_mu/8 on 32x32 images (grid 4x4) from a checkpoint trained on a 2x2 grid.
    ref = torch_vit(input_shape=(16, 16), patch=(8, 8), width=64, mlp_dim=256)
    path = save_safetensors(with_head(ref.state_dict(), 64), tmp_path / "vit_mu.safetensors")
    config = load_config(
        REPO / "configs" / "simclr.py:tiny",
        [f"input.store={store}", "input.global_batch=8", f"init.from={path}"],
    )
    state = train(config, tmp_path / "w", max_steps=0)
    params = state["params"]["image_encoder"]
    module = ViT(**{**VIT, "width": 64, "mlp_dim": 256}, patch_size=(8, 8))
    variables, want_record, _ = load(path, module, grey((2, 32, 32)))
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(variables["params"]),
                         jax.tree.leaves(params), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(p))
    record = json.loads((tmp_path / "w" / "init_from.json").read_text())
    assert record == json.loads(json.dumps(want_record))
    assert record["pos_embed"].startswith("2x2 grid (+1 class) -> 4x4 (+1 class)")
    assert str(tmp_path) not in json.dumps(record)  # the file by name only


# ---------------------------------------------------------------------------------------------
# Without pretraining: an ablation's `transfer` row


def transfer_ablation(checkpoint, **kw):
    import ml_collections

    rows = (dict(name="simclr", config="configs/simclr.py:tiny", overrides=()),)
    transfer = dict(checkpoint=None if checkpoint is None else str(checkpoint), config=None,
                    overrides=(), **kw)  # fmt: skip
    return ml_collections.ConfigDict(dict(rows=rows, overrides=(), reference="simclr",
                                          transfer=transfer))  # fmt: skip


def test_transfer_row_embeds_with_the_checkpoint_and_is_skipped_without_one(store, tmp_path):
    from pgjax.data.store import open_array
    from pgjax.eval.embed import cached_embeddings
    from pgjax.eval.sweep import check_references, transfer_row

    ref = torch_vit(input_shape=(32, 32), patch=(8, 8), width=64, mlp_dim=256)
    path = save_safetensors(with_head(ref.state_dict(), 64), tmp_path / "vit_mu.safetensors")
    log = []
    row, failed, skipped = transfer_row(transfer_ablation(path), str(store), tmp_path / "sweep",
                                        "simclr", log.append)  # fmt: skip
    assert failed == skipped == []
    model, info = row
    assert model.transfer and model.name == "transfer" and info["reference"] == "simclr"
    assert info["config"] == ("(transfer: vit_mu.safetensors into configs/simclr.py:tiny, "
                              "no pretraining)")  # fmt: skip
    assert "vit_mu/8 (width 64)" == info["image_encoder"]["label"]
    assert json.loads((tmp_path / "sweep" / "transfer" / "init_from.json").read_text())["loaded"]
    # The row's features are the torch model's on the store's images (as RGB).
    rows = np.arange(4)
    emb, _ = cached_embeddings(model, store, rows, tmp_path / "cache", batch=4)
    pixels = open_array(store / "images" / "pixels")[rows].read().result()
    x = pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 65535.0)
    np.testing.assert_allclose(emb["image"], torch_features(ref, x), atol=1e-4, rtol=0)
    assert any("[sweep] transfer: " in m and "vit_mu.safetensors" in m for m in log)

    # A checkpoint that does not fit: a failed row naming the parameter, the sweep goes on.
    small = torch_vit(input_shape=(32, 32), patch=(8, 8)).state_dict()
    small = save_safetensors(small, tmp_path / "small.safetensors")
    row, failed, skipped = transfer_row(transfer_ablation(small), str(store), tmp_path / "s2",
                                        "simclr", log.append)  # fmt: skip
    assert row is None and skipped == [] and [n for n, _ in failed] == ["transfer"]
    assert "patch_embed/kernel" in failed[0][1] and "[8, 8, 1, 32] vs model [8, 8, 1, 64]" in (
        failed[0][1]
    )  # fmt: skip
    # No checkpoint: skipped with the reason; no transfer field: nothing at all.
    assert transfer_row(transfer_ablation(None), str(store), tmp_path / "s3", "simclr") == (
        None, [], [("transfer", "skipped: no checkpoint given (ablation field "
                                "transfer.checkpoint)")],
    )  # fmt: skip
    bare = transfer_ablation(None)
    del bare["transfer"]
    assert transfer_row(bare, str(store), tmp_path / "s4", "simclr") == (None, [], [])
    with pytest.raises(ValueError, match="ablation field transfer: unknown keys"):
        transfer_row(transfer_ablation(path, checkpint="x"), str(store), tmp_path, "simclr")
    clash = transfer_ablation(path)
    clash.rows = (*clash.rows, dict(name="transfer", config="configs/pg.py:tiny"))
    with pytest.raises(ValueError, match="'transfer' is the transfer row's name"):
        check_references(clash)
