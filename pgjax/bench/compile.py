"""`pgjax bench compile`: what a config's train step costs on a mesh, from the compiler alone.

The real train step (the config's model, objectives, optimizer, sharding rules and global
batch) is lowered and compiled for a (data, fsdp) mesh from abstract inputs
(`jax.ShapeDtypeStruct`s, the state's shapes from `jax.eval_shape`): nothing is allocated and
no step runs, so a cluster config compiles on a CPU host whose 8 "devices" come from
XLA_FLAGS=--xla_force_host_platform_device_count=8. Recorded per config and mesh:

- XLA's FLOPs of the per-device program (`cost_analysis`), times the devices for the step;
- per-device memory (`memory_analysis`): arguments, outputs, aliased (donated) bytes,
  temporaries, generated code, and their peak estimate, arguments + outputs - aliased +
  temporaries; and the per-device bytes of parameters and optimizer state from their shardings;
- every collective in the optimised HLO (all-gather, reduce-scatter, all-reduce,
  collective-permute, all-to-all): count and bytes, an asynchronous start/done pair counted
  once. Counts are of HLO instructions: one inside a loop body counts once;
- the largest temporaries, named by their HLO instruction and the JAX operation it came from
  (the `op_name` metadata), read from XLA's buffer assignment (dumped for this one compile);
- flags for collectives moving a [B, B] array (a similarity matrix) or a [b, F, V] array
  (per-field logits over the whole vocabulary), b the global or per-device batch.

These are the figures of XLA:CPU's compile: a GPU compile fuses differently (bf16 dots stay
bf16, attention may be a cuDNN call), so memory on a GPU differs; collectives and the sharding
of parameters follow the mesh and the rules, and carry over.
"""

from __future__ import annotations

import glob
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from pgjax.bench.record import write_record

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
DEFAULT_MESHES = ("data=8", "data=2,fsdp=4", "fsdp=8")

# LLVM's optimisation of the CPU code: it changes neither the optimised HLO nor its buffers,
# collectives or FLOPs, and level 0 compiles about twice as fast.
FAST_BACKEND = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# An array shape in HLO text: f32[8,128]{1,0} (the layout, in braces, is optional).
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
# One instruction: "%name = SHAPE(S) opcode(operands), attributes".
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*?)\)(?:,|$)", re.M
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_mesh(text: str) -> dict[str, int]:
    """A mesh like "data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; an axis left out has size 1."""
    sizes = {"data": 1, "fsdp": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh {text!r}: expected data=N and/or fsdp=N with N >= 1")
        sizes[name] = int(value)
    return sizes


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _SHAPE.findall(text)]


def _nbytes(shapes) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in shapes)


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of an optimised HLO module's text: one entry per operation, {kind,
    bytes, shapes}. bytes: the larger of its operands' and its results' total size (the full
    side: an all-gather's result, a reduce-scatter's operand), per device. An asynchronous
    "-start"/"-done" pair is one operation, its bytes from the start's operands and the done's
    result; a collective wrapped in an async computation counts once, as itself."""
    starts: dict[str, list] = {}
    out = []
    for name, result, opcode, operands in _INSTRUCTION.findall(hlo_text):
        base = opcode.removesuffix("-start").removesuffix("-done")
        if base not in COLLECTIVES:
            continue
        ins = _shapes(operands)
        if opcode.endswith("-start"):
            starts[name] = ins
            continue
        if opcode.endswith("-done"):
            ins = starts.pop(operands.strip().lstrip("%").split(",")[0].split()[-1], [])
        outs = _shapes(result)
        out.append(
            {
                "kind": base,
                "instruction": name,
                "bytes": max(_nbytes(ins), _nbytes(outs)),
                "shapes": sorted({s for _, s in ins + outs}),
            }
        )
    return out


def summarize_collectives(ops: list[dict]) -> dict:
    """{kind: {count, bytes, largest_bytes}} for every kind (zeros where none)."""
    summary = {k: {"count": 0, "bytes": 0, "largest_bytes": 0} for k in COLLECTIVES}
    for op in ops:
        s = summary[op["kind"]]
        s["count"] += 1
        s["bytes"] += op["bytes"]
        s["largest_bytes"] = max(s["largest_bytes"], op["bytes"])
    return summary


def forbidden_collectives(
    ops: list[dict], batch: int, n_devices: int, fields: int, vocab: int, names=None,
    parameter_shapes=frozenset(),
):
    """Collectives moving a [B, B] array (both dimensions a batch size, size-1 dimensions
    dropped) or a [b, F, V] one, b the global batch or a device's share of it. A [B, b] shape
    whose b also equals the protocol sequence (F fields, F + 1 with the cls token) is the
    protocol encoder's [B, F + 1] (as at B = 256 on 8 devices with F = 31), not a similarity
    matrix: a [B, B] block of a ring is [b, b], and the whole matrix [B, B] or [b, B]. A shape
    in `parameter_shapes` (a parameter's, whole or one device's shard) is a parameter or its
    gradient, such as a 1x1 convolution's [1, 1, 256, 256] kernel at B = 256."""
    batches = {batch, batch // n_devices}
    sequence = {fields, fields + 1}
    names = names or {}
    bad = []
    for op in ops:
        for shape in op["shapes"]:
            if tuple(shape) in parameter_shapes:
                continue
            dims = tuple(d for d in shape if d != 1)
            if (
                len(dims) == 2
                and set(dims) <= batches
                and not (dims[0] == batch and dims[1] in sequence and dims[1] != batch)
            ):
                bad.append({"kind": op["kind"], "shape": list(shape), "why": "[B, B]",
                            "op_name": names.get(op.get("instruction"), "")})  # fmt: skip
            elif len(dims) == 3 and dims[0] in batches and dims[1:] == (fields, vocab):
                bad.append({"kind": op["kind"], "shape": list(shape), "why": "[B, F, V]",
                            "op_name": names.get(op.get("instruction"), "")})  # fmt: skip
    return bad


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX operation it came from (its op_name metadata)."""
    names = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            op = _OP_NAME.search(line)
            if op:
                names[m.group(1)] = op.group(1)
    return names


def largest_temporaries(buffer_assignment: str, names: dict[str, str], top: int = 10) -> list:
    """The largest values XLA placed in its temporary allocation ("preallocated-temp"), from a
    buffer-assignment dump: [{bytes, shape, instruction, op_name}], largest first."""
    values = {}
    in_temp = False
    value = re.compile(r"^\s*value: <\d+ ([\w.\-]+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")
    for line in buffer_assignment.splitlines():
        if line.startswith("allocation"):
            in_temp = "preallocated-temp" in line
        elif in_temp:
            m = value.match(line)
            if m:
                instr, size, shape = m.group(1), int(m.group(2)), m.group(3)
                values[instr] = {
                    "bytes": size,
                    "shape": shape.split("{")[0],
                    "instruction": instr,
                    "op_name": names.get(instr, ""),
                }
    return sorted(values.values(), key=lambda v: -v["bytes"])[:top]


def _abstract_batch(config, info, image_shape, batch: int, sharding) -> dict:
    """The raw batch as ShapeDtypeStructs: the dtypes and trailing shapes of a one-item batch
    made the way `pgjax bench train` makes its random batches."""
    from pgjax.bench.train import _random_batch

    one = _random_batch(config, info, image_shape, 1)
    return {
        k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype, sharding=sharding)
        for k, v in one.items()
    }


def schema_protocol_info(categorical: int = 256, freetext: int = 4096, numeric_bins: int = 16):
    """A ProtocolInfo of the default schema's shape when no store is given: each categorical
    field `categorical` ids, each free-text one `freetext`, each numeric one `numeric_bins`, a
    presence field 2 (a cluster's vocabulary size is the store's; these are stand-ins, and the
    record says which was used)."""
    from pgjax.data.schema import Schema
    from pgjax.data.tokenizer import SPECIALS
    from pgjax.objectives import ProtocolInfo

    ranges, start = [], len(SPECIALS)
    fields = Schema().fields
    for f in fields:
        if f.kind == "numeric":
            n = numeric_bins
        elif f.kind == "presence":
            n = 2
        else:
            n = freetext if f.freetext else categorical
        ranges.append((start, start + n))
        start += n
    return ProtocolInfo(
        keywords=tuple(f.keyword for f in fields), field_ranges=tuple(ranges), vocab_size=start,
        text_fields=tuple(f.keyword for f in fields if f.freetext),
    )  # fmt: skip


def _parameter_shapes(abstract, shardings) -> frozenset:
    """Every parameter's shape, whole and as one device's shard (the discriminator's too)."""
    shapes = set()
    for key in ("params", "disc_params"):
        if key not in abstract:
            continue
        leaves = jax.tree.leaves(abstract[key])
        shards = jax.tree.leaves(
            shardings[key], is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )
        for x, sh in zip(leaves, shards, strict=True):
            shapes |= {tuple(x.shape), tuple(sh.shard_shape(x.shape))}
    return frozenset(shapes)


def _sharded_bytes(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return int(
        sum(
            math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
            for x, s in zip(leaves, shards, strict=True)
        )
    )


def compile_step_report(config, info, image_shape, mesh_sizes: dict, devices=None) -> dict:
    """Lower and compile `config`'s train step on a mesh of `mesh_sizes` from abstract inputs;
    the figures of one record row."""
    from pgjax.train import mesh as mesh_lib
    from pgjax.train import train as T

    n = mesh_sizes["data"] * mesh_sizes["fsdp"]
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(
            f"mesh {mesh_sizes} needs {n} devices, {len(devices)} present (on a CPU: "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}, set before JAX starts)"
        )
    mesh = mesh_lib.make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], devices[:n])
    s = T.setup_on(config, mesh, info)
    global_batch = config.input.global_batch
    batch = _abstract_batch(config, info, image_shape, global_batch, mesh_lib.batch_sharding(mesh))
    example = jax.eval_shape(T.prepare_batch, batch)
    abstract, shardings = T.abstract_state(s, example)
    state = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
    )
    dump = tempfile.mkdtemp(prefix="pgjax-compile-")
    try:
        t0 = time.perf_counter()
        lowered = T.compile_step(s, shardings).lower(state, batch)
        # The dump is the only way to XLA's buffer assignment (the named temporaries).
        # LLVM's cheap settings on a CPU (code quality does not change the buffers); an
        # accelerator compiles as a run would.
        fast = FAST_BACKEND if devices[0].platform == "cpu" else {}
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump, **fast})
        compile_s = time.perf_counter() - t0
        found = sorted(glob.glob(f"{dump}/*after_optimizations-buffer-assignment.txt"))
        assignment = Path(found[-1]).read_text() if found else ""
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    memory = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
    }
    memory["peak_bytes"] = (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
        + memory["temp_bytes"]
    )  # fmt: skip
    ops = collectives(hlo)
    names = op_names(hlo)
    opt_keys = [k for k in ("opt_state", "disc_opt_state") if k in abstract]
    return {
        "mesh": mesh_sizes,
        "devices": n,
        "global_batch": global_batch,
        "compile_s": compile_s,
        "flops_per_step_per_device": flops,
        "flops_per_step": flops * n,
        "memory_per_device": memory,
        "params_bytes_per_device": _sharded_bytes(abstract["params"], shardings["params"]),
        "opt_state_bytes_per_device": sum(
            _sharded_bytes(abstract[k], shardings[k]) for k in opt_keys
        ),
        "params_bytes_total": _sharded_bytes(
            abstract["params"],
            jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract["params"]),
        ),
        "collectives": summarize_collectives(ops),
        "forbidden_collectives": forbidden_collectives(
            ops, global_batch, n, info.num_fields, info.vocab_size, names,
            _parameter_shapes(abstract, shardings),
        ),
        "largest_temporaries": largest_temporaries(assignment, names)
        if assignment
        else "not available: XLA wrote no buffer assignment",
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_bench(
    config_path: str, overrides, *, meshes=DEFAULT_MESHES, image_size: int = 256, store=None,
    out_dir="benchmarks/results",
):  # fmt: skip
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import protocol_info

    commit = _commit()  # now: the code this process imported, not what HEAD is when it ends
    config = load_config(config_path, overrides)
    if store:
        info, vocabulary = protocol_info(store), "the store's"
    else:
        info, vocabulary = schema_protocol_info(), "schema stand-in (see schema_protocol_info)"
    shape = [image_size, image_size]
    rows = []
    for text in meshes:
        sizes = parse_mesh(text)
        row = compile_step_report(config, info, shape, sizes)
        rows.append(row)
        mem = row["memory_per_device"]
        coll = ", ".join(
            f"{k} {v['count']}x {v['bytes'] / 2**20:.1f} MiB"
            for k, v in row["collectives"].items()
            if v["count"]
        )
        print(
            f"{config_path} {text}: {row['flops_per_step'] / 1e12:.2f} TFLOP/step, "
            f"peak {mem['peak_bytes'] / 2**30:.2f} GiB/device (temp "
            f"{mem['temp_bytes'] / 2**30:.2f}), params+opt "
            f"{(row['params_bytes_per_device'] + row['opt_state_bytes_per_device']) / 2**20:.0f}"
            f" MiB/device; {coll or 'no collectives'}"
            + ("; FORBIDDEN: " + str(row["forbidden_collectives"]))
            * bool(row["forbidden_collectives"]),
            flush=True,
        )
    settings = {
        "config": config_path,
        "overrides": [
            "input.store=(given)" if o.startswith("input.store=") else o for o in overrides
        ],
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "image_shape": shape,
        "vocabulary": vocabulary,
        "vocab_size": info.vocab_size,
        "num_fields": info.num_fields,
        "commit": commit,
        "model": config.model.to_dict(),
    }
    return write_record("compile", {"runs": rows}, settings, out_dir)
