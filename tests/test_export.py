"""Export to PyTorch: converter rules, parity of trained tiny models of every architecture (2D
ViT with the protocol encoder and projections, trained in bf16; ResNet with BatchNorm running
statistics; 3D ViT on volumes), PyTorch inference on real DICOM files in a process where JAX
cannot be imported, and the timm layout.

The three models are trained once per module, for 2 steps, in parallel `pgjax train`
subprocesses on one CPU device each (compiling dominates; parity needs a real checkpoint, not a
good model).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_corpus import copy_with_identity, ct_series, real_corpus
from pydicom.data import get_testdata_file

from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
VENDORS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"]
TOL = 1e-4

# Run code with JAX and its libraries blocked (sys.meta_path), then run the given module.
BLOCKED_RUN = (
    "import sys, runpy; from pgjax.export.torch_side import block_jax; block_jax(); "
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
)


def blocked(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BLOCKED_RUN, module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# Stores and trained models


@pytest.fixture(scope="module")
def dicom2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_dicom2d")
    for n in range(16):
        if n % 2:
            extra, src = {"KVP": 80 + 20 * (n % 3)}, "CT_small.dcm"
        else:
            extra, src = {"RepetitionTime": 500.0 * (1 + n % 3)}, "MR_small.dcm"
        copy_with_identity(get_testdata_file(src), root / "site_a" / f"{n:03d}.dcm", patient=n,
                           tag=f"e{n}", Manufacturer=VENDORS[n % 3], **extra)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def dicom3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_dicom3d")
    for s in range(8):
        ct_series(root / "site_a" / f"p{s}", patient=s, n_slices=8, tag=f"ser{s}")
    return root


@pytest.fixture(scope="module")
def stores(dicom2d, dicom3d, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_stores")
    cfg = PreprocessConfig(image_size=(32, 32), volume_shape=(8, 32, 32), min_patients=2,
                           split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
    preprocess([dicom2d], out / "s2d", cfg=cfg, workers=1)
    preprocess([dicom3d], out / "s3d", cfg=cfg, workers=1)
    return {"2d": out / "s2d", "3d": out / "s3d"}


COMMON = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.log_every=1",
          "--config.augment.preset=none"]  # fmt: skip
# name -> (config, store, overrides). Lighter objectives than the full configs compile faster;
# what is exported (encoders, projections, BatchNorm statistics) is the same.
MODELS = {
    "vit2d": ("pg", "2d", ["--config.objectives.masked_protocol.weight=0.0",
                           "--config.objectives.translation.weight=0.0",
                           "--config.model.dtype=bfloat16", "--config.input.global_batch=16"]),
    "resnet": ("dcm", "2d", ["--config.model.image_encoder=resnet_mu",
                             "--config.input.global_batch=16"]),
    "vit3d": ("dcm", "3d", ["--config.model.image_encoder=vit3d_mu/4x8x8",
                            "--config.input.group=volumes", "--config.input.global_batch=8"]),
}  # fmt: skip


def train_models(names, stores, root: Path) -> dict[str, Path]:
    """Train the named MODELS at once, one `pgjax train` process each on one CPU device."""
    flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    procs = {}
    for name in names:
        config, store, extra = MODELS[name]
        cmd = [sys.executable, "-m", "pgjax.cli", "train", "--config",
               str(REPO / "configs" / f"{config}.py:tiny"), "--workdir", str(root / name),
               f"--config.input.store={stores[store]}", *COMMON, *extra]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for name, p in procs.items():
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{name}:\n{out[-3000:]}"
    return {name: root / name for name in names}


@pytest.fixture(scope="module")
def workdirs(stores, tmp_path_factory):
    """The 2D models (default suite); the 3D ViT trains in `exports3d` (slow tests only)."""
    return train_models(["vit2d", "resnet"], stores, tmp_path_factory.mktemp("export_runs"))


@pytest.fixture(scope="module")
def exports(workdirs, tmp_path_factory):
    """Each 2D model exported once; the ViT through the `pgjax export` command."""
    from pgjax.export.exporter import export

    root = tmp_path_factory.mktemp("export_out")
    cmd = [sys.executable, "-m", "pgjax.cli", "export", "--workdir", str(workdirs["vit2d"]),
           "--out", str(root / "vit2d")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity max |torch - jax|" in proc.stdout
    export(workdirs["resnet"], root / "resnet")
    return {name: root / name for name in ("vit2d", "resnet")}


@pytest.fixture(scope="module")
def exports3d(stores, tmp_path_factory):
    from pgjax.export.exporter import export

    workdir = train_models(["vit3d"], stores, tmp_path_factory.mktemp("export_runs3d"))["vit3d"]
    out = tmp_path_factory.mktemp("export_out3d") / "vit3d"
    export(workdir, out)
    return {"vit3d": out}


# ---------------------------------------------------------------------------------------------
# Trained models: parity, files, round trips


def check_export(out: Path, name: str) -> None:
    for f in ("model.safetensors", "config.json", "modeling_pgjax.py", "parity.json"):
        assert (out / f).exists(), f
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["max_abs"] <= TOL
    # Random inputs and the store's real preprocessed items were both compared.
    assert set(report["inputs"]) == {"random", "store"}
    embeddings = {k.split("/")[1] for k in report["outputs"]}
    expected = {"image_pooled"} | ({"image_proj", "protocol_pooled", "protocol_proj"}
                                   if name == "vit2d" else set())  # fmt: skip
    assert embeddings == expected
    for o in report["outputs"].values():
        assert o["finite"] and o["max_abs"] <= TOL and o["max_abs_reference"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab"]["format"] == "pgjax-vocabulary" and config["schema_version"]
    assert (config["input"]["group"] == "volumes") == (name == "vit3d")
    assert ("timm" in config) == (name == "vit2d")
    from safetensors.numpy import load_file

    dtypes = {v.dtype for k, v in load_file(str(out / "model.safetensors")).items()
              if not k.endswith("num_batches_tracked")}  # fmt: skip
    assert dtypes == {np.dtype(np.float32)}


@pytest.mark.parametrize("name", ["vit2d", "resnet"])
def test_export_writes_the_folder_and_parity_passes(exports, name):
    check_export(exports[name], name)


@pytest.mark.slow
def test_export_3d_vit_parity(exports3d):
    check_export(exports3d["vit3d"], "vit3d")


def test_bf16_trained_model_exports_float32(workdirs, exports):
    config = json.loads((exports["vit2d"] / "config.json").read_text())
    assert config["source"]["trained_dtype"] == "bfloat16"
    assert config["source"]["exported_dtype"] == "float32"


def test_resnet_export_carries_the_running_statistics(workdirs, exports):
    from safetensors.numpy import load_file

    from pgjax.train.checkpoint import load_state

    state, _ = load_state(workdirs["resnet"])
    stats = state["model_state"]["batch_stats"]["image_encoder"]["norm1"]
    torch_state = load_file(str(exports["resnet"] / "model.safetensors"))
    np.testing.assert_array_equal(torch_state["image_encoder.norm1.running_var"], stats["var"])
    assert not np.allclose(stats["var"], 1.0)  # training moved them: a real check


@pytest.mark.parametrize("name", ["vit2d", "resnet"])
def test_jax_inference_loads_workdir_and_export_alike(workdirs, exports, stores, name):
    """load(workdir) equals the trained objective's own embed_images (in float32), and
    load(OUT) (weights back from safetensors) equals load(workdir)."""
    import jax

    from pgjax.export.source import build_objective_for, read_training_config
    from pgjax.inference import load
    from pgjax.train.checkpoint import load_state

    images = np.random.default_rng(1).uniform(size=(3, 32, 32)).astype(np.float32)
    from_workdir = load(workdirs[name]).embed_images(images)
    from_export = load(exports[name]).embed_images(images)
    np.testing.assert_allclose(from_export, from_workdir, atol=1e-6, rtol=0)

    config = read_training_config(workdirs[name])
    config["model"]["dtype"] = "float32"
    from pgjax.data.store import open_store

    objective = build_objective_for(config, open_store(stores["2d"]))
    state, _ = load_state(workdirs[name])
    variables = {"params": state["params"], **state["model_state"]}
    ref = jax.jit(objective.embed_images)(variables, images[..., None])
    np.testing.assert_allclose(from_workdir, np.asarray(ref), atol=1e-5, rtol=0)


def test_parity_failure_leaves_a_failed_folder_and_no_export(workdirs, tmp_path):
    from pgjax.export.exporter import export
    from pgjax.export.parity import ParityError

    with pytest.raises(ParityError, match="parity failed"):
        export(workdirs["resnet"], tmp_path / "out", tolerance=0.0)
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.failed" / "parity.json").read_text())
    assert not report["passed"]


def test_export_errors_name_the_problem(workdirs, stores, tmp_path):
    from pgjax.export.exporter import export
    from pgjax.export.source import ExportError

    with pytest.raises(ExportError, match="no config.json"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="pass --store"):
        export(workdirs["resnet"], tmp_path / "out", store=tmp_path / "nowhere")
    with pytest.raises(ExportError, match="vocabulary has .* the checkpoint"):
        export(workdirs["vit2d"], tmp_path / "out", store=stores["3d"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not a pgjax export; refusing"):
        export(workdirs["resnet"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").exists()


def _probe_record(workdir, store, step: int = 2) -> dict:
    """A calibrated probe on the image and protocol embeddings of a model, as `pgjax eval`
    writes one: the probe from the store items' embeddings, per-group temperatures keyed by
    the items' own vendor x model tokens (one group left to the global temperature)."""
    from pgjax.data.store import open_store
    from pgjax.eval import calibration as cal
    from pgjax.eval.probe import LinearProbe
    from pgjax.inference import load

    st = open_store(store)
    rows = np.arange(8)
    arrays = {n: st.images.array(n)[rows].read().result() for n in ("pixels", "tokens", "values",
                                                                   "value_mask")}  # fmt: skip
    model = load(workdir)
    x = np.concatenate([model.embed_images(arrays["pixels"]),
                        model.embed_protocol(arrays["tokens"], arrays["values"],
                                             arrays["value_mask"])], axis=1)  # fmt: skip
    rng = np.random.default_rng(5)
    probe = LinearProbe(x.mean(0), x.std(0) + 1e-3, rng.normal(0, 0.3, x.shape[1]), -0.2, 1.0,
                        "test")  # fmt: skip
    columns = [list(st.vocabulary().keywords).index(f) for f in cal.GROUP_FIELDS]
    keys = sorted(set(cal.group_keys(arrays["tokens"][:, columns])))
    assert len(keys) >= 2
    fit = {"method": "protocol", "temperature": 1.8, "n": 8, "fields": list(cal.GROUP_FIELDS),
           "min_count": 1, "groups": {keys[0]: {"temperature": 0.6, "n": 4, "n_pos": 2,
                                                "name": "a"}},
           "fallback": {}}  # fmt: skip
    return cal.probe_record(
        probe=probe, calibration=fit, inputs=["image", "protocol"], group_columns=columns,
        provenance={"task": "t", "label": "t", "model": "vit2d", "head": "linear+protocol",
                    "label_fraction": 1.0, "seed": 0, "step": step,
                    "vocab_sha256": st.manifest.get("vocab_sha256")},
    )  # fmt: skip


def test_export_carries_the_calibrated_probe_and_novelty(workdirs, stores, dicom2d, tmp_path):
    """The same calibrated probabilities and novelty scores in PyTorch as in JAX: within 1e-5
    on the same embeddings (the computation), within the embeddings' own parity end to end."""
    from pgjax.export.exporter import export
    from pgjax.export.source import ExportError
    from pgjax.export.torch_side import load_modeling
    from pgjax.inference import load

    record = _probe_record(workdirs["vit2d"], stores["2d"])
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps(record))
    out = tmp_path / "out"
    report = export(workdirs["vit2d"], out, calibration=probe_file)
    assert {"random/proba", "random/novelty", "store/proba"} <= set(report["derived"])
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"]["method"] == "protocol"
    assert config["protocol_stats"]["file"] == "protocol_stats.npz"

    jax_model = load(out)
    torch_model = load_modeling(out).from_pretrained(out)
    from pgjax.data.store import open_store

    st = open_store(stores["2d"])
    rows = np.arange(16)
    a = {n: st.images.array(n)[rows].read().result() for n in ("pixels", "tokens", "values",
                                                               "value_mask")}  # fmt: skip
    image = jax_model.embed_images(a["pixels"])
    protocol = jax_model.embed_protocol(a["tokens"], a["values"], a["value_mask"])
    for calibrated in (True, False):
        p_jax = jax_model.calibrated_proba(image, protocol, a["tokens"], calibrated)
        p_torch = torch_model.calibrated_proba(image, protocol, a["tokens"], calibrated)
        np.testing.assert_allclose(p_torch, p_jax, atol=1e-5, rtol=0)
    calibrated = jax_model.calibrated_proba(image, protocol, a["tokens"])
    raw = jax_model.calibrated_proba(image, protocol, a["tokens"], calibrated=False)
    assert not np.allclose(calibrated, raw)  # the temperatures act
    # Item by item: the group's temperature, or the global one.
    logit = np.log(raw / (1 - raw))
    from pgjax.eval import calibration as cal

    keys = cal.group_keys(a["tokens"][:, record["group_columns"]])
    expected_t = np.where(keys == next(iter(record["calibration"]["groups"])), 0.6, 1.8)
    np.testing.assert_allclose(calibrated, 1 / (1 + np.exp(-logit / expected_t)), atol=1e-9)
    # End to end from pixels and tokens.
    args = (a["pixels"], a["tokens"], a["values"], a["value_mask"])
    np.testing.assert_allclose(torch_model.predict_proba(*args), jax_model.predict_proba(*args),
                               atol=1e-4, rtol=0)  # fmt: skip
    n_jax = jax_model.protocol_novelty(a["tokens"], a["values"], a["value_mask"])
    n_torch = torch_model.protocol_novelty(a["tokens"], a["values"], a["value_mask"])
    assert n_torch["unusual"] == n_jax["unusual"]
    np.testing.assert_allclose(torch_model.novelty_from_embedding(protocol),
                               jax_model.novelty_from_embedding(protocol), rtol=1e-6)
    np.testing.assert_allclose(n_torch["novelty"], n_jax["novelty"], rtol=1e-3)
    # torch_infer writes the calibrated and raw probabilities beside the novelty score.
    proc = blocked("pgjax.torch_infer", dicom2d, "--model", out, "--out", tmp_path / "e.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "e.npz")
    n = len(got["path"])
    assert n == 16 and got["protocol_novelty"].shape == (n,) and got["unusual_values"].shape == (n,)
    assert np.all((got["probability"] > 0) & (got["probability"] < 1))
    assert not np.allclose(got["probability"], got["probability_uncalibrated"])

    # A probe fitted on another checkpoint step, or on another vocabulary, is refused.
    probe_file.write_text(json.dumps({**record, "step": 7}))
    with pytest.raises(ExportError, match="probe.json: the probe was fitted on .* step 7"):
        export(workdirs["vit2d"], tmp_path / "bad", calibration=probe_file)
    probe_file.write_text(json.dumps({**record, "vocab_sha256": "0" * 64}))
    with pytest.raises(ExportError, match="another protocol vocabulary"):
        export(workdirs["vit2d"], tmp_path / "bad", calibration=probe_file)
    probe_file.write_text("{}")
    with pytest.raises(ExportError, match="not a pgjax calibration file"):
        export(workdirs["vit2d"], tmp_path / "bad", calibration=probe_file)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# PyTorch inference on DICOM, JAX blocked


def test_torch_infer_on_real_dicom_matches_jax(exports, tmp_path):
    """pydicom's test files (several transfer syntaxes, RGB, multi-frame) and broken files:
    PyTorch embeddings from a JAX-free process equal the JAX model's on the same items."""
    from pgjax.data.dicom_items import encode_files, expand_inputs
    from pgjax.inference import load

    real_corpus(tmp_path / "dicom")
    out = tmp_path / "emb.npz"
    # Small chunks: rows from several chunks must come out in file order.
    proc = blocked("pgjax.torch_infer", tmp_path / "dicom", "--model", exports["vit2d"],
                   "--out", out, "--chunk-files", "7")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    reasons = dict(zip(got["skipped_path"], got["skipped_reason"], strict=True))
    for name in ("truncated.dcm", "notes.txt", "DICOMDIR", "plan.dcm", "unknown_syntax.dcm"):
        assert any(Path(p).name == name for p in reasons), name  # listed with a reason
        assert f"skipped {next(p for p in reasons if Path(p).name == name)}" in proc.stderr
    assert len(got["path"]) >= 10  # 9 real files + the CT series' slices
    assert got["image_embedding"].shape == (len(got["path"]), 64)

    jax_model = load(exports["vit2d"])
    cfg = PreprocessConfig.from_json(jax_model.config["preprocess"])
    from pgjax.data.tokenizer import Vocabulary

    vocab = Vocabulary.from_json(jax_model.config["vocab"])
    items = encode_files(expand_inputs([tmp_path / "dicom"]), cfg, vocab, "images")
    assert [p for p, _ in items.sources] == list(got["path"])
    pairs = {
        "image_embedding": jax_model.embed_images(items.pixels),
        "image_projection": jax_model.project_images(items.pixels),
        "protocol_embedding": jax_model.embed_protocol(
            items.tokens, items.values, items.value_mask
        ),  # fmt: skip
        "protocol_projection": jax_model.project_protocol(
            items.tokens, items.values, items.value_mask
        ),  # fmt: skip
    }
    for key, ref in pairs.items():
        np.testing.assert_allclose(got[key], ref, atol=TOL, rtol=0, err_msg=key)
    # The protocol-novelty score and the unusual values, from the export's protocol_stats.npz.
    novelty = jax_model.protocol_novelty(items.tokens, items.values, items.value_mask)
    np.testing.assert_allclose(got["protocol_novelty"], novelty["novelty"], rtol=1e-3)
    assert list(got["unusual_values"]) == ["; ".join(u) for u in novelty["unusual"]]
    assert any("(unseen)" in u for u in got["unusual_values"])  # files unlike the training set


def _rows(*arrays) -> list[bytes]:
    return sorted(b"".join(np.ascontiguousarray(a[i]).tobytes() for a in arrays)
                  for i in range(len(arrays[0])))  # fmt: skip


@pytest.mark.parametrize("group", ["images", "volumes"])
def test_inference_items_equal_the_store(stores, dicom2d, dicom3d, group):
    """DICOM files read for inference give exactly the store's pixels and tokens (the same
    preprocessing and tokenizer), whatever the row order."""
    from pgjax.data.dicom_items import encode_files, expand_inputs
    from pgjax.data.store import open_store

    store = open_store(stores["2d" if group == "images" else "3d"])
    src = dicom2d if group == "images" else dicom3d
    cfg = PreprocessConfig.from_json(store.manifest["config"])
    items = encode_files(expand_inputs([src]), cfg, store.vocabulary(), group)
    g = store.group(group)
    stored = [g.array(a).read().result() for a in ("pixels", "tokens", "values", "value_mask")]
    assert items.skipped == []
    assert _rows(items.pixels, items.tokens, items.values, items.value_mask) == _rows(*stored)


@pytest.mark.slow
def test_torch_infer_on_volumes(exports3d, dicom3d, tmp_path):
    from pgjax.data.dicom_items import encode_files, expand_inputs
    from pgjax.data.tokenizer import Vocabulary
    from pgjax.inference import load

    out = tmp_path / "emb.npz"
    proc = blocked("pgjax.torch_infer", dicom3d, "--model", exports3d["vit3d"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert got["image_embedding"].shape == (8, 64) and set(got["frame"]) == {-1}
    jax_model = load(exports3d["vit3d"])
    cfg = PreprocessConfig.from_json(jax_model.config["preprocess"])
    items = encode_files(expand_inputs([dicom3d]), cfg,
                         Vocabulary.from_json(jax_model.config["vocab"]), "volumes")  # fmt: skip
    np.testing.assert_allclose(got["image_embedding"], jax_model.embed_images(items.pixels),
                               atol=TOL, rtol=0)  # fmt: skip


def test_torch_infer_bad_model_folder(tmp_path):
    proc = blocked("pgjax.torch_infer", tmp_path, "--model", tmp_path / "none", "--out",
                   tmp_path / "x.npz")  # fmt: skip
    assert proc.returncode == 2 and "not a pgjax export" in proc.stderr


# ---------------------------------------------------------------------------------------------
# No JAX on the PyTorch side


def test_pytorch_side_imports_without_jax():
    """The modules `python -m pgjax.torch_infer` needs import with JAX blocked."""
    code = (
        "from pgjax.export.torch_side import block_jax; block_jax()\n"
        "import pgjax, pgjax.cli, pgjax.torch_infer, pgjax.data.dicom_items, pgjax.export\n"
        "import pgjax.export.torch_side, pgjax.export.convert\n"
        "from pgjax.export import torch_side\n"
        "m = torch_side.load_modeling('pgjax/export')\n"
        "try:\n"
        "    import jax\n"
        "except ImportError as e:\n"
        "    print('blocked:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blocked: import of 'jax' blocked" in proc.stdout


def test_modeling_file_needs_only_torch_and_numpy():
    from pgjax.export import exporter, source

    tree = ast.parse(exporter.MODELING_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "json", "math", "os", "struct", "numpy", "torch"}, roots
    text = exporter.MODELING_FILE.read_text()
    assert "scaled_dot_product_attention" in text
    assert f'EXPORT_FORMAT = "{source.EXPORT_FORMAT}"' in text
    assert f"EXPORT_VERSION = {source.EXPORT_VERSION}" in text


# ---------------------------------------------------------------------------------------------
# Converter rules and module variants (initialised, not trained: no train step to compile)


def _variant(architecture: dict, shape, seed=0):
    """Flax variables of an initialised architecture, BatchNorm statistics randomised."""
    import jax

    from pgjax.export.architecture import flax_modules

    module = flax_modules(architecture)["image_encoder"]
    variables = jax.tree.map(
        np.asarray, module.init(jax.random.key(seed), np.zeros((1, *shape, 1), np.float32))
    )
    rng = np.random.default_rng(seed)
    variables = {col: {"image_encoder": tree} for col, tree in variables.items()}
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(
            lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32), variables["batch_stats"]
        )
    return variables


VARIANTS = {
    # Flax's tanh GELU must become torch's tanh GELU (torch defaults to exact erf).
    "vit_tanh_gelu_gap": ({"kind": "vit", "width": 32, "depth": 1, "num_heads": 2,
                           "mlp_dim": 64, "patch_size": [8, 4], "pool": "gap",
                           "gelu_approximate": True}, (16, 16)),
    # Two stages: the stride-2 3x3 conv and the projection shortcut, on odd sizes.
    "resnet_bottleneck": ({"kind": "resnet", "stage_sizes": [1, 1], "block": "bottleneck",
                           "width": 8, "norm": "batch", "group_norm_groups": 32}, (33, 31)),
    "resnet_groupnorm_3d": ({"kind": "resnet", "stage_sizes": [1, 1], "block": "basic",
                             "width": 8, "norm": "group", "group_norm_groups": 4}, (9, 16, 16)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_module_variants_match_torch(name):
    import torch

    from pgjax.export import exporter
    from pgjax.export.convert import from_torch, model_rules, to_torch
    from pgjax.export.torch_side import load_modeling
    from pgjax.inference import JaxEncoder

    arch, shape = VARIANTS[name]
    architecture = {"image_encoder": arch}
    variables = _variant(architecture, shape)
    config = {"format": "pgjax-export", "version": 1, "architecture": architecture,
              "input": {"shape": list(shape)}}  # fmt: skip
    rules = model_rules(architecture)
    state = to_torch(variables, rules)
    # The rules are their own inverse.
    back = from_torch(state, rules)
    import jax

    jax.tree.map(np.testing.assert_array_equal, back, variables)

    modeling = load_modeling(exporter.MODELING_FILE.parent)
    model = modeling.PgjaxModel(config)
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.eval()
    images = np.random.default_rng(2).uniform(size=(2, *shape)).astype(np.float32)
    ref = JaxEncoder(config, variables).embed_images(images)
    np.testing.assert_allclose(model.embed_images(images), ref, atol=TOL, rtol=0)


def test_unknown_parameters_are_an_error_not_dropped():
    from pgjax.export.convert import model_rules, to_torch

    arch, shape = VARIANTS["vit_tanh_gelu_gap"]
    variables = _variant({"image_encoder": arch}, shape)
    variables["params"]["image_encoder"]["extra_scale"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="no export rule.*extra_scale"):
        to_torch(variables, model_rules({"image_encoder": arch}))


# ---------------------------------------------------------------------------------------------
# timm


def test_timm_layout_loads_into_timm(exports):
    try:
        import timm
    except ImportError as e:  # timm (and its torchvision dependency) are not project deps
        pytest.skip(f"timm is not importable here ({e}); the timm-layout check needs it")
    import torch
    from safetensors.torch import load_file

    from pgjax.export.torch_side import load_modeling

    out = exports["vit2d"]
    spec = json.loads((out / "config.json").read_text())["timm"]
    model = timm.create_model(**spec["create_model"]).eval()
    model.load_state_dict(load_file(str(out / spec["weights"])), strict=True)
    images = np.random.default_rng(3).uniform(size=(2, 32, 32)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(images)[:, None]).numpy()
    ours = load_modeling(out).from_pretrained(out).embed_images(images)
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Benchmark


@pytest.mark.slow
def test_export_bench_writes_a_record_and_the_report_reads_it(workdirs, tmp_path):
    from pgjax.bench.export import run_bench
    from pgjax.bench.report import write_report

    results = tmp_path / "benchmarks" / "results"
    path = run_bench(workdir=workdirs["vit2d"], batch=4, seconds=0.1, threads=(1,),
                     out_dir=results)  # fmt: skip
    record = json.loads(Path(path).read_text())
    f = record["figures"]
    assert record["benchmark"] == "export" and f["parity_max_abs"] <= TOL
    assert f["bench_inputs_max_abs"] <= TOL
    assert set(f["jax"]) == {"image", "protocol"} and f["torch"][0]["threads"] == 1
    for part in ("image", "protocol"):
        assert f["jax"][part]["items_per_s"] > 0 and f["torch"][0][part]["items_per_s"] > 0
    report = write_report(results).read_text()
    assert "PyTorch export" in report and "| vit_mu/8 | 32x32 | 4 | 1 | image |" in report
