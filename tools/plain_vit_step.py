"""A plain-JAX ViT train step, the yardstick for `pgjax bench train` (it does not import pgjax).

ViT (pre-norm blocks, cls token, learned position embeddings; parameters float32, compute in
--dtype), a linear projection of the cls token against fixed random protocol embeddings with a
sigmoid (SigLIP-shaped) loss over the [B, B] pairs, and AdamW; the batch split over every
device, parameters replicated (pgjax's data=N mesh). Per image size: compile time, XLA's FLOPs
per step, step time on a resident batch, images/s and the achieved FLOP rate, into one JSON
record under --out.

    python3 tools/plain_vit_step.py --sizes 224,256 --batch 256 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SIZES = {"mu": (64, 2, 2, 256), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072)}


def init_params(rng, width, depth, mlp, patch, tokens, embed=512):
    keys = iter(jax.random.split(rng, 4 + 4 * depth))

    def dense(n_in, n_out):
        return {"w": jax.random.normal(next(keys), (n_in, n_out)) * 0.02, "b": jnp.zeros(n_out)}

    def norm():
        return {"scale": jnp.ones(width), "bias": jnp.zeros(width)}

    blocks = [
        {
            "norm1": norm(),
            "qkv": dense(width, 3 * width),
            "proj": dense(width, width),
            "norm2": norm(),
            "fc1": dense(width, mlp),
            "fc2": dense(mlp, width),
        }  # fmt: skip
        for _ in range(depth)
    ]
    return {
        "patch": dense(patch * patch, width),
        "cls": jnp.zeros((1, 1, width)),
        "pos": jax.random.normal(next(keys), (1, tokens + 1, width)) * 0.02,
        "blocks": blocks,
        "norm": norm(),
        "head": dense(width, embed),
        "log_scale": jnp.log(10.0),
        "bias": jnp.asarray(-10.0),
    }


def forward(params, images, *, heads, patch, dtype, attention):
    def layer_norm(x, p):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = x32.var(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]
        return y.astype(dtype)

    def dense(x, p):
        return x @ p["w"].astype(dtype) + p["b"].astype(dtype)

    b, h, w = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    x = dense(x.reshape(b, -1, patch * patch).astype(dtype), params["patch"])
    cls = jnp.broadcast_to(params["cls"].astype(dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + params["pos"].astype(dtype)
    t, width = x.shape[1:]
    for blk in params["blocks"]:
        q, k, v = jnp.split(dense(layer_norm(x, blk["norm1"]), blk["qkv"]), 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, width // heads) for a in (q, k, v))
        a = jax.nn.dot_product_attention(q, k, v, implementation=attention)
        x = x + dense(a.reshape(b, t, width), blk["proj"])
        y = jax.nn.gelu(dense(layer_norm(x, blk["norm2"]), blk["fc1"]), approximate=False)
        x = x + dense(y, blk["fc2"])
    z = dense(layer_norm(x, params["norm"])[:, 0], params["head"]).astype(jnp.float32)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def loss_fn(params, images, targets, **kw):
    z = forward(params, images, **kw)
    logits = z @ targets.T * jnp.exp(params["log_scale"]) + params["bias"]
    labels = 2.0 * jnp.eye(z.shape[0]) - 1.0  # +1 on the diagonal, -1 elsewhere
    return -jnp.mean(jax.nn.log_sigmoid(labels * logits)) * z.shape[0]


def measure(args, side: int) -> dict:
    width, depth, heads, mlp = SIZES[args.size]
    patch = args.patch
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(
        init_params(jax.random.key(0), width, depth, mlp, patch, (side // patch) ** 2), rep
    )
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
    opt_state = jax.device_put(tx.init(params), rep)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.random((args.batch, side, side), np.float32), rows)
    targets = rng.normal(size=(args.batch, 512)).astype(np.float32)
    targets = jax.device_put(targets / np.linalg.norm(targets, axis=1, keepdims=True), rows)
    kw = dict(heads=heads, patch=patch, dtype=jnp.dtype(args.dtype), attention=args.attention)

    def step(params, opt_state, images, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, targets, **kw)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, images, targets).compile()
    )
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    params, opt_state, loss = compiled(params, opt_state, images, targets)  # warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, loss = compiled(params, opt_state, images, targets)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - t0) / args.steps
    n = len(devices)
    return {
        "image_shape": [side, side],
        "devices": n,
        "global_batch": args.batch,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "flops_per_step_per_device": flops,
        "flops_per_step": flops * n,
        "achieved_flops_per_s": flops * n / step_s,
        "loss": float(loss),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="b", help="ViT size (b: ViT-B)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--sizes", default="224,256", help="image sides, e.g. 224,256")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--attention", default=None, choices=["xla", "cudnn"],
        help="jax.nn.dot_product_attention's implementation (default: JAX's choice)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the JSON record")
    args = p.parse_args(argv)
    if args.batch % len(jax.devices()):
        p.error(f"--batch {args.batch} is not a multiple of the {len(jax.devices())} devices")
    runs = []
    for side in (int(s) for s in args.sizes.split(",") if s):
        run = measure(args, side)
        runs.append(run)
        print(f"plain ViT-{args.size}/{args.patch} {side}px batch {args.batch}: "
              f"{run['images_per_s']:.1f} images/s, {run['flops_per_step'] / 1e9:.1f} GFLOP/step, "
              f"{run['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s", flush=True)  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": "plain_vit_step",
        "time_utc": now.isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
        "settings": {
            "vit": f"{args.size}/{args.patch}",
            "dtype": args.dtype,
            "attention": args.attention,
            "steps": args.steps,
            "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
        },  # fmt: skip
        "figures": {"runs": runs},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"plain_vit_step-{args.attention or 'default'}-{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
