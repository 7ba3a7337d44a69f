"""`pgjax bench compile`: collectives counted in optimised HLO, buffers named, meshes parsed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pgjax.bench import compile as bc


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=bc.FAST_BACKEND)


def test_collectives_of_a_program_with_known_ones():
    """A psum, an all_gather and a ppermute on an 8-device mesh: one of each, with its bytes."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))

    def body(x):
        total = jax.lax.psum(x, "d")  # [4, 16] f32 per device: 256 bytes
        gathered = jax.lax.all_gather(x, "d", tiled=True)  # [32, 16] f32: 2048 bytes
        shifted = jax.lax.ppermute(x, "d", [(i, (i + 1) % 8) for i in range(8)])
        return total + shifted + gathered[:4] * 2.0

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    x = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    ops = bc.collectives(_compile(fn, x).as_text())
    summary = bc.summarize_collectives(ops)
    assert summary["all-reduce"] == {"count": 1, "bytes": 256, "largest_bytes": 256}
    assert summary["all-gather"] == {"count": 1, "bytes": 2048, "largest_bytes": 2048}
    assert summary["collective-permute"] == {"count": 1, "bytes": 256, "largest_bytes": 256}
    assert summary["reduce-scatter"]["count"] == summary["all-to-all"]["count"] == 0


def test_a_jit_program_without_collectives_has_none():
    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    ops = bc.collectives(_compile(lambda a: jnp.tanh(a @ a), x).as_text())
    assert ops == []


def test_async_pairs_count_once_with_the_full_size():
    hlo = """
  %ags = (f32[4,16]{1,0}, f32[32,16]{1,0}) all-gather-start(f32[4,16]{1,0} %p), dimensions={0}
  %agd = f32[32,16]{1,0} all-gather-done((f32[4,16]{1,0}, f32[32,16]{1,0}) %ags)
  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %q), to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)
  %rs = bf16[8,4]{1,0} reduce-scatter(bf16[64,4]{1,0} %r), dimensions={0}, to_apply=%add
  %ar2 = (f32[3]{0}, f32[5,2]{1,0}) all-reduce(f32[3]{0} %a, f32[5,2]{1,0} %b), to_apply=%add
"""
    summary = bc.summarize_collectives(bc.collectives(hlo))
    assert summary["all-gather"] == {"count": 1, "bytes": 32 * 16 * 4, "largest_bytes": 2048}
    # A combined all-reduce moves all its operands; the reduce-scatter, its full input.
    assert summary["all-reduce"] == {"count": 2, "bytes": 4096 + 52, "largest_bytes": 4096}
    assert summary["reduce-scatter"] == {"count": 1, "bytes": 64 * 4 * 2, "largest_bytes": 512}


def test_forbidden_shapes_are_flagged_and_others_not():
    ops = [
        {"kind": "all-gather", "bytes": 0, "shapes": [(256, 256)]},  # [B, B]
        {"kind": "all-gather", "bytes": 0, "shapes": [(32, 1, 256)]},  # [b, B], size 1 dropped
        {"kind": "all-reduce", "bytes": 0, "shapes": [(32, 31, 900)]},  # [b, F, V]
        {"kind": "all-reduce", "bytes": 0, "shapes": [(32, 256, 768)]},  # tokens: fine
        {"kind": "all-reduce", "bytes": 0, "shapes": [(512, 900)]},  # a kernel: fine
        {"kind": "all-reduce", "bytes": 0, "shapes": [(256, 32)]},  # [B, F + 1] = [B, B / 8]
        {"kind": "all-reduce", "bytes": 0, "shapes": [(1, 1, 256, 256)]},  # a 1x1 conv kernel
    ]
    kernels = frozenset({(1, 1, 256, 256)})
    bad = bc.forbidden_collectives(
        ops, batch=256, n_devices=8, fields=31, vocab=900, parameter_shapes=kernels
    )
    assert [b["why"] for b in bad] == ["[B, B]", "[B, B]", "[B, F, V]"]


def test_largest_temporaries_are_named_from_the_buffer_assignment():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    w = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "d")))
    x = jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    import glob
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as dump:
        compiled = (
            jax.jit(jax.grad(loss))
            .lower(w, x)
            .compile(compiler_options={"xla_dump_to": dump, **bc.FAST_BACKEND})
        )
        (found,) = glob.glob(f"{dump}/*after_optimizations-buffer-assignment.txt")
        temps = bc.largest_temporaries(Path(found).read_text(), bc.op_names(compiled.as_text()))
    assert temps and temps == sorted(temps, key=lambda t: -t["bytes"])
    biggest = temps[0]
    # The largest temporary is a [B, 128/8 or 128]-shaped activation of the dot or its grad.
    dims = [int(d) for d in biggest["shape"].split("[")[1].rstrip("]").split(",")]
    assert biggest["bytes"] == 4 * np.prod(dims) and biggest["op_name"].startswith("jit(loss)")


def test_parse_mesh():
    assert bc.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert bc.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
    with pytest.raises(ValueError, match="expected data=N"):
        bc.parse_mesh("model=2")


@pytest.mark.slow  # two train steps compiled for 2 devices: about 40 s of CPU
def test_compile_report_of_a_config_and_its_table(tmp_path, capsys):
    """The command end to end on a tiny config, two 2-device meshes: with fsdp=2 each device
    holds half the parameters and optimizer state (up to the replicated small arrays)."""
    from pathlib import Path

    from pgjax.bench.report import write_report
    from pgjax.cli import main

    repo = Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    argv = ["bench", "compile", "--config", f"{repo}/configs/mae.py:tiny", "--image-size", "32",
            "--mesh", "data=2", "--mesh", "fsdp=2", "--out", str(results)]  # fmt: skip
    assert main(argv) == 0
    (path,) = results.glob("compile-*.json")
    import json

    record = json.loads(path.read_text())
    data, fsdp = record["figures"]["runs"]
    assert data["mesh"] == {"data": 2, "fsdp": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 2}
    both = [r["params_bytes_per_device"] + r["opt_state_bytes_per_device"] for r in (data, fsdp)]
    assert 0.5 <= both[1] / both[0] < 0.6, both
    assert data["params_bytes_total"] == fsdp["params_bytes_total"]
    assert data["params_bytes_total"] == data["params_bytes_per_device"]
    # Data parallelism all-reduces the gradients; FSDP gathers parameters and scatters gradients.
    assert data["collectives"]["all-reduce"]["count"] > 0
    assert data["collectives"]["all-gather"]["count"] == 0
    assert fsdp["collectives"]["all-gather"]["count"] > 0
    for r in (data, fsdp):
        mem = r["memory_per_device"]
        assert mem["peak_bytes"] >= mem["temp_bytes"] > 0 and r["flops_per_step"] > 0
        assert r["forbidden_collectives"] == [] and r["largest_temporaries"][0]["bytes"] > 0
    report = write_report(results).read_text()
    assert "## Compiled train step" in report and "| fsdp=2 |" in report
    assert main(["bench", "compile", "--config", f"{repo}/configs/mae.py:tiny", "--mesh",
                 "data=16", "--out", str(results)]) == 2  # fmt: skip
    assert "needs 16 devices, 8 present" in capsys.readouterr().err


def test_the_stand_in_vocabulary_has_the_default_schema_shape():
    """Without --store the command scores a stand-in vocabulary: one id range per field of the
    default schema, contiguous after the special tokens (the records' V = 19,686)."""
    from pgjax.data.schema import Schema

    info = bc.schema_protocol_info()
    fields = Schema().fields
    assert info.keywords == tuple(f.keyword for f in fields)
    assert info.text_fields == tuple(f.keyword for f in fields if f.freetext)
    ranges = info.field_ranges
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[-1][1] == info.vocab_size == 19686
