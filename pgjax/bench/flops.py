"""Model FLOPs of a train step, counted from the model's math rather than from XLA's program.

XLA's cost analysis counts what it compiles: with `remat` every rematerialised block is counted
twice, so an MFU from it rises when the step does more work. Model FLOPs (Chowdhery et al.
2022, "PaLM", appendix B) count only what the model needs: for a transformer of N matmul
parameters, L layers, width d and sequence length T, per token

    6 N + 12 L d T        (forward 2 N + 4 L d T: the dense layers, then Q K^T and A V;
                           backward twice the forward)

Here the count is made from the traced loss itself, so every model the objectives use (image
encoder, protocol encoder passes, fusion passes with their cross-attention, heads, convolutions
of a ResNet) is covered: the FLOPs of every matrix product and convolution in the forward pass
(2 per multiply-add, from their shapes; fused attention calls from their Q, K, V shapes), times
3 for forward + backward (CE+DCM: see `step_model_flops`). For a ViT this is exactly the formula
above (tested). Loops of unknown trip count (while) count once; a `cond` counts its largest
branch; a shard_map body counts once per device. Nothing else (norms, softmax, the optimizer) is
counted: that is the convention of the formula.
"""

from __future__ import annotations

import math

import jax

TRAIN_OVER_FORWARD = 3  # backward = twice the forward, for products


def _jaxprs(value):
    """The jaxprs inside one equation parameter value (a jaxpr, closed or not, or a sequence)."""
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
        return [value.jaxpr]
    if hasattr(value, "eqns"):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _jaxprs(v)]
    return []


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
    # The kernel's input-feature dimension is already per group.
    per_output = kernel[spec[1]] * math.prod(kernel[d] for d in spec[2:])
    return 2 * math.prod(out) * per_output


def _attention_flops(eqn) -> int:
    """A fused attention call (e.g. cuDNN's): Q K^T and A V from q [B, T, N, H], k [B, S, K, H]."""
    q, k = (v.aval.shape for v in eqn.invars[:2])
    b, t, n, h = q
    return 4 * b * n * t * k[1] * h


def jaxpr_flops(jaxpr) -> int:
    """Forward FLOPs of the products and convolutions in a jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif "dot_product_attention" in name and len(eqn.invars) >= 3:
            total += _attention_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(j) for j in _jaxprs(eqn.params["branches"]))
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _jaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                axes = eqn.params.get("manual_axes") or mesh.axis_names
                inner *= math.prod(mesh.shape[a] for a in axes)
            total += inner
    return total


def forward_flops(fn, *args) -> int:
    """Forward FLOPs of fn(*args), args arrays or ShapeDtypeStructs (nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def step_model_flops(objective, abstract_state: dict, example_batch: dict, seed: int = 0) -> int:
    """Model FLOPs of one train step of `objective` on `example_batch` (the prepared global
    batch): 3 x the forward FLOPs of the loss the step differentiates. With CE+DCM, whose loss
    takes the discriminator's gradients in its forward pass (objectives/ce_dcm.py), 3 x would
    triple that backward work too: the differentiated step is counted as traced instead (the
    generator's backward as its transposed products, the discriminator's as they stand)."""
    variables = {"params": abstract_state["params"], **abstract_state["model_state"]}
    rng = jax.random.key(seed)
    if objective.has_discriminator:

        def loss(params, state, batch, rng):
            return objective.loss({"params": params, **state}, batch, rng)[0]

        step = jax.make_jaxpr(jax.grad(loss))(
            abstract_state["params"], abstract_state["model_state"], example_batch, rng
        )
        return jaxpr_flops(step.jaxpr)
    total = forward_flops(lambda v, b, r: objective.loss(v, b, r)[0], variables, example_batch, rng)
    return TRAIN_OVER_FORWARD * total


def transformer_train_flops(matmul_params: int, layers: int, width: int, seq: int) -> int:
    """PaLM's model FLOPs of one training sequence: (6 N + 12 L d T) T."""
    return (6 * matmul_params + 12 * layers * width * seq) * seq
