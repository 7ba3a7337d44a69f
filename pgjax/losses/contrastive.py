"""Protocol-image contrastive losses, exact over the global batch however it is sharded.

Every item of the global batch (all devices, all hosts) is a negative for every other item. Two
ways to get there from inside `shard_map`, both returning the same scalar on every device:

- all-gather: gather the other modality's embeddings and compute this device's rows against the
  whole batch. Simple, but each device holds a [local, global] logits block (and its softmax for
  the backward pass), which grows with the global batch squared over the device count.
- ring: n steps; at each one a device scores its local rows against the chunk of the other
  modality it currently holds, folds the block into running per-row statistics, and passes the
  chunk to its neighbour with `ppermute`. Only a [local, local] block is ever alive, and the
  backward pass recomputes blocks instead of storing them (`jax.checkpoint`); what it keeps is
  the chunks seen, [global, D] in all, as much as the all-gather's gathered embeddings.

The dense functions are the single-device references the sharded ones are tested against.

Gradients: the sharded losses end in a `psum`, so every device returns the global loss. Under
`shard_map`'s default `check_vma=True`, differentiating (outside the shard_map or inside it) gives
each device the gradient of the global loss w.r.t. its own shard, and the gradient w.r.t. a
replicated `log_scale` / `bias` summed over devices: a psum of device-varying values transposes to
a plain broadcast, and the implicit broadcast of a replicated input transposes to a psum. With
`check_vma=False` a gradient taken inside the shard_map comes out n times too large for the
embeddings and device-local for the scalars; keep the default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

try:  # newer jax exports it at top level; older releases only had the experimental one
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover - depends on the installed jax
    from jax.experimental.shard_map import shard_map as _shard_map

AxisName = str | tuple[str, ...]

# Stands in for -inf where an entry must not count: finite, so that a row whose every entry is
# masked still has a finite logsumexp and a NaN-free gradient.
MASKED_LOGIT = -1e30


# The similarity products at full float32 precision. By default XLA runs a float32 matmul in
# one bf16 pass on TPU (TF32 on recent GPUs): a cosine off by ~1e-3 becomes a logit off by ~0.1
# at scale 100, far above the 1e-5 the CPU tests hold the sharded losses to. The blocks are
# [b, b] x D, a negligible share of a step, so exactness costs nothing that matters.
PRECISION = lax.Precision.HIGHEST


def _logits(x: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * x @ y.T in float32 (bf16 embeddings still accumulate softmax stats in f32)."""
    return scale * jnp.einsum(
        "id,jd->ij", x, y, preferred_element_type=jnp.float32, precision=PRECISION
    )


def _paired(x: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * <x_i, y_i> per row: the positive logits, [b]."""
    return scale * jnp.einsum(
        "id,id->i", x, y, preferred_element_type=jnp.float32, precision=PRECISION
    )


def _scale(log_scale) -> jax.Array:
    return jnp.exp(jnp.asarray(log_scale, jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array, axis_name: AxisName | None = None) -> jax.Array:
    """Mean of x over the entries where mask is true, over the global batch.

    x, mask: same shape (mask broadcastable to x). With `axis_name` (inside shard_map) the sum and
    the count are psum-ed first, so devices holding different numbers of masked entries still get
    the global mean, not a mean of means. Returns 0 when nothing is masked.
    """
    mask = jnp.broadcast_to(mask, x.shape)
    total = jnp.sum(jnp.where(mask, x, 0).astype(jnp.float32))
    count = jnp.sum(mask, dtype=jnp.float32)
    if axis_name is not None:
        total, count = lax.psum((total, count), axis_name)
    return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------------
# Dense references (one device holds the whole batch)


def clip_loss(img: jax.Array, txt: jax.Array, log_scale) -> jax.Array:
    """Symmetric InfoNCE of CLIP on one device.

    img, txt: [N, D], L2-normalised by the caller; row i of each is the same item.
    log_scale: scalar; the logits are exp(log_scale) * img @ txt.T.
    Returns the scalar mean of the image->protocol and protocol->image cross entropies.
    """
    logits = _logits(img, txt, _scale(log_scale))
    pos = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - pos
    t2i = jax.nn.logsumexp(logits, axis=0) - pos
    return (jnp.mean(i2t) + jnp.mean(t2i)) / 2


def siglip_loss(img: jax.Array, txt: jax.Array, log_scale, bias) -> jax.Array:
    """Sigmoid loss of Zhai et al. 2023 on one device.

    -(1/N) sum_i sum_j log sigmoid(z_ij * (t * <img_i, txt_j> + bias)), z = +1 on the diagonal
    and -1 elsewhere, t = exp(log_scale). img, txt: [N, D] L2-normalised. Returns a scalar.
    """
    n = img.shape[0]
    logits = _logits(img, txt, _scale(log_scale)) + bias
    z = jnp.where(jnp.eye(n, dtype=bool), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


# ---------------------------------------------------------------------------------------------
# Ring machinery (call inside shard_map)


def ring_permutation(n: int) -> list[tuple[int, int]]:
    """Device j sends to device j + 1 (mod n): one step of the ring, as ppermute pairs."""
    return [(j, (j + 1) % n) for j in range(n)]


def ring_logsumexp(
    x: jax.Array,
    y: jax.Array,
    scale,
    axis_name: AxisName,
    *,
    columns: bool = False,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Row (and column) logsumexp of scale * X @ Y.T over the global batch, block by block.

    Call inside shard_map. x, y: this device's [b, D] shards of the global X, Y ([n*b, D] over
    `axis_name`, a mesh axis name or a tuple of them). Each device holds one [b, b] logits block at
    a time; per-row statistics are folded in with logaddexp (the online softmax), so the result is
    exact and stable without ever holding a [b, n*b] block.

    Returns (rows, cols):
      rows [b]: log sum_j exp(scale <x_i, y_j>) over every global j, for the local x rows.
      cols [b] (if `columns`, else None): log sum_i exp(scale <x_i, y_j>) over every global i,
        for the local y rows. These statistics travel round the ring with their y chunk and take
        one last (cheap, [b]) hop home.
    exclude_self: leave out each pair of an item with itself (the same global index), which
      NT-Xent needs when X and Y are the same views.
    """
    n = lax.axis_size(axis_name)
    b = x.shape[0]
    perm = ring_permutation(n)

    # Checkpointed so that the backward pass recomputes each [b, b] block from its y chunk
    # instead of the scan saving all n of them (which would be a [b, n*b] array again).
    @functools.partial(jax.checkpoint, static_argnums=(1,))
    def block_stats(y_chunk, diagonal_masked):
        logits = _logits(x, y_chunk, scale)
        if diagonal_masked:
            logits = jnp.where(jnp.eye(b, dtype=bool), MASKED_LOGIT, logits)
        col = jax.nn.logsumexp(logits, axis=0) if columns else None
        return jax.nn.logsumexp(logits, axis=1), col

    # Step 0: the device's own chunk, the only block that holds the diagonal.
    rows, cols = block_stats(y, exclude_self)

    def step(carry, _):
        y_chunk, cols, rows = carry
        y_chunk = lax.ppermute(y_chunk, axis_name, perm)
        r, c = block_stats(y_chunk, False)
        rows = jnp.logaddexp(rows, r)
        if columns:
            cols = jnp.logaddexp(lax.ppermute(cols, axis_name, perm), c)
        return (y_chunk, cols, rows), None

    (_, cols, rows), _ = lax.scan(step, (y, cols, rows), None, length=n - 1)
    if columns:
        # After n - 1 hops device i holds the chunk (and stats) of device i + 1: one more hop.
        cols = lax.ppermute(cols, axis_name, perm)
    return rows, cols


def _global_size(local: int, axis_name: AxisName) -> int:
    return local * lax.axis_size(axis_name)


def clip_loss_sharded(img_local, txt_local, log_scale, axis_name: AxisName) -> jax.Array:
    """`clip_loss` over the global batch, by the ring; call inside shard_map.

    img_local, txt_local: this device's [b, D] shards (L2-normalised) of the global [n*b, D]
    batch, sharded over `axis_name`. log_scale: replicated scalar.
    Returns the global loss, the same scalar on every device.
    """
    t = _scale(log_scale)
    rows, cols = ring_logsumexp(img_local, txt_local, t, axis_name, columns=True)
    pos = _paired(img_local, txt_local, t)
    local = jnp.sum(rows - pos) + jnp.sum(cols - pos)
    return lax.psum(local, axis_name) / (2 * _global_size(img_local.shape[0], axis_name))


def siglip_loss_sharded(img_local, txt_local, log_scale, bias, axis_name: AxisName) -> jax.Array:
    """`siglip_loss` over the global batch, by the ring (Zhai et al.'s chunked form).

    Call inside shard_map. img_local, txt_local: [b, D] shards of the global [n*b, D] batch;
    log_scale, bias: replicated scalars. Returns the same scalar on every device.
    """
    n = lax.axis_size(axis_name)
    b = img_local.shape[0]
    t = _scale(log_scale)
    perm = ring_permutation(n)

    # Checkpointed as in ring_logsumexp: recompute blocks in the backward pass.
    @functools.partial(jax.checkpoint, static_argnums=(1,))
    def block_loss(txt_chunk, has_positives):
        logits = _logits(img_local, txt_chunk, t) + bias
        z = jnp.where(jnp.eye(b, dtype=bool), 1.0, -1.0) if has_positives else -1.0
        return -jnp.sum(jax.nn.log_sigmoid(z * logits))

    def step(carry, _):
        txt_chunk, acc = carry
        txt_chunk = lax.ppermute(txt_chunk, axis_name, perm)
        return (txt_chunk, acc + block_loss(txt_chunk, False)), None

    (_, local), _ = lax.scan(step, (txt_local, block_loss(txt_local, True)), None, length=n - 1)
    return lax.psum(local, axis_name) / (n * b)


# ---------------------------------------------------------------------------------------------
# All-gather variants (call inside shard_map): simpler, [b, n*b] logits per device.


def clip_loss_allgather(img_local, txt_local, log_scale, axis_name: AxisName) -> jax.Array:
    """`clip_loss_sharded` by all-gathering both modalities; same arguments and result."""
    t = _scale(log_scale)
    img_all = lax.all_gather(img_local, axis_name, tiled=True)
    txt_all = lax.all_gather(txt_local, axis_name, tiled=True)
    rows = jax.nn.logsumexp(_logits(img_local, txt_all, t), axis=1)
    cols = jax.nn.logsumexp(_logits(txt_local, img_all, t), axis=1)
    pos = _paired(img_local, txt_local, t)
    local = jnp.sum(rows - pos) + jnp.sum(cols - pos)
    return lax.psum(local, axis_name) / (2 * _global_size(img_local.shape[0], axis_name))


def siglip_loss_allgather(img_local, txt_local, log_scale, bias, axis_name: AxisName) -> jax.Array:
    """`siglip_loss_sharded` by all-gathering the protocol embeddings; same arguments and result."""
    b = img_local.shape[0]
    txt_all = lax.all_gather(txt_local, axis_name, tiled=True)
    logits = _logits(img_local, txt_all, _scale(log_scale)) + bias
    # axis_index linearises a tuple of axes in the same order as the tiled all_gather.
    first = lax.axis_index(axis_name) * b
    positive = jnp.arange(txt_all.shape[0])[None, :] == first + jnp.arange(b)[:, None]
    local = -jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)))
    return lax.psum(local, axis_name) / _global_size(b, axis_name)


# ---------------------------------------------------------------------------------------------
# Global-array entry points for the training step


def sharded_loss(
    local_fn: Callable[..., jax.Array],
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str],
    batched: Sequence[jax.Array],
    replicated: Sequence = (),
) -> jax.Array:
    """Run a per-device loss under shard_map with the batch split over `batch_axes`.

    local_fn(*batched_shards, *replicated, axis_name) must return the same scalar on every device
    (the sharded losses here do). batched: global arrays with the batch on axis 0, which must be
    divisible by the product of the `batch_axes` sizes; replicated: scalars or small arrays every
    device sees whole. Mesh axes not in `batch_axes` see the batch replicated. Differentiable.
    """
    batch_axes = tuple(batch_axes)
    shards = 1
    for a in batch_axes:
        shards *= mesh.shape[a]
    for x in batched:
        if x.shape[0] % shards:
            raise ValueError(
                f"batch of {x.shape[0]} does not split over {shards} shards of {batch_axes}"
            )
    axis_name: AxisName = batch_axes[0] if len(batch_axes) == 1 else batch_axes
    batch_spec = P(batch_axes)
    types = {mesh.axis_types[mesh.axis_names.index(a)] for a in batch_axes}
    if types == {AxisType.Explicit}:
        # Explicit axes: shard_map requires the input sharding to match its spec exactly.
        reshard = getattr(jax, "reshard", None) or jax.sharding.reshard
        batched = [reshard(x, NamedSharding(mesh, batch_spec)) for x in batched]
    elif AxisType.Explicit in types:
        raise ValueError(f"batch axes {batch_axes} mix explicit and non-explicit axis types")

    def per_device(*args):
        return local_fn(*args, axis_name)

    in_specs = (batch_spec,) * len(batched) + (P(),) * len(replicated)
    fn = _shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())
    return fn(*batched, *replicated)


_SHARDED = {
    ("clip", "ring"): clip_loss_sharded,
    ("clip", "allgather"): clip_loss_allgather,
    ("siglip", "ring"): siglip_loss_sharded,
    ("siglip", "allgather"): siglip_loss_allgather,
}


def contrastive_loss(
    img: jax.Array,
    txt: jax.Array,
    log_scale,
    bias=None,
    *,
    kind: Literal["clip", "siglip"] = "clip",
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data",),
    method: Literal["ring", "allgather"] = "ring",
) -> jax.Array:
    """Protocol-image contrastive loss of a global batch sharded over `batch_axes` of `mesh`.

    img, txt: global [N, D] arrays, L2-normalised, row i of each the same item; N divisible by
    the number of batch shards. log_scale (and bias, SigLIP only): scalars, replicated.
    kind: "clip" (symmetric softmax) or "siglip" (pairwise sigmoid). method: "ring" (memory
    O(local^2) per device) or "allgather" (O(local * N)). Returns the scalar loss, identical to
    the dense `clip_loss` / `siglip_loss` on the gathered batch; differentiable.
    """
    try:
        local_fn = _SHARDED[(kind, method)]
    except KeyError:
        raise ValueError(f"unknown contrastive loss kind={kind!r} method={method!r}") from None
    if (bias is None) != (kind == "clip"):
        raise ValueError("siglip needs a bias; clip takes none")
    replicated = (log_scale,) if kind == "clip" else (log_scale, bias)
    return sharded_loss(local_fn, mesh, batch_axes, (img, txt), replicated)
