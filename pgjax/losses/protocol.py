"""Protocol losses: masked protocol prediction and protocol-protocol translation.

A protocol is F tokens, one per schema field, drawn from one shared vocabulary of V ids in which
each field owns a contiguous id range; numeric fields also carry a normalised value. The model
predicts, for a field, a distribution over the vocabulary and (for numeric fields) the value.

The softmax of a field is restricted to the ids it can legitimately take: its own range plus
MISSING and UNK. Without the restriction the model would spend capacity learning that a
Manufacturer is never a kVp bin, and ids of other fields would dilute the cross entropy.

The heads score each field against those candidate ids only (`FieldCandidates`): logits
[B, F, C], C = 2 + the longest field range, rather than [B, F, V] over the whole vocabulary
(F times fewer products in the head, and no [B, F, V] array to store or move). The losses take
either form and give the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgjax.data.tokenizer import MASK, MISSING, PAD, UNK
from pgjax.losses.contrastive import MASKED_LOGIT, AxisName, masked_mean

# The tokenizer's special ids. MISSING (field absent from the header) and UNK (value too rare to
# keep) are facts about an item, so they are legitimate targets; PAD and MASK are artefacts of
# batching and of the pretext task, and never are.
NUM_SPECIAL = max(PAD, MISSING, UNK, MASK) + 1

def allowed_targets(field_ranges: Sequence[tuple[int, int]], vocab_size: int) -> np.ndarray:
    """Which ids each field may take: bool [F, V].

    field_ranges: per field, the half-open range [start, stop) of its own ids in the vocabulary
    (`Vocabulary.field_ranges`); ranges start after the special ids and may be empty. Each row is
    that range plus MISSING and UNK.
    """
    allowed = np.zeros((len(field_ranges), vocab_size), dtype=bool)
    allowed[:, [MISSING, UNK]] = True
    for f, (start, stop) in enumerate(field_ranges):
        if not NUM_SPECIAL <= start <= stop <= vocab_size:
            raise ValueError(
                f"field {f}: id range [{start}, {stop}) is not inside [{NUM_SPECIAL}, {vocab_size})"
            )
        allowed[f, start:stop] = True
    return allowed


# The special ids a field may take, in id order (so ties in an argmax resolve as over the
# whole vocabulary).
SCORED_SPECIALS = tuple(sorted((MISSING, UNK)))


@dataclasses.dataclass(frozen=True)
class FieldCandidates:
    """The ids each field is scored over: MISSING and UNK, then its own range, in id order.

    ranges: per field, [start, stop) of its ids (`Vocabulary.field_ranges`); vocab_size: V.
    Candidate j of field f is `ids[f, j]` where `valid[f, j]`; rows are padded to the longest
    (C = 2 + the longest range) with PAD, never valid.
    """

    ranges: tuple[tuple[int, int], ...]
    vocab_size: int

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple((int(a), int(b)) for a, b in self.ranges))
        allowed_targets(self.ranges, self.vocab_size)  # the same checks of the ranges

    @property
    def width(self) -> int:
        return len(SCORED_SPECIALS) + max((b - a for a, b in self.ranges), default=0)

    def field_ids(self, f: int) -> np.ndarray:
        start, stop = self.ranges[f]
        return np.concatenate([SCORED_SPECIALS, np.arange(start, stop)]).astype(np.int32)

    @property
    def ids(self) -> np.ndarray:
        out = np.full((len(self.ranges), self.width), PAD, np.int32)
        for f in range(len(self.ranges)):
            ids = self.field_ids(f)
            out[f, : len(ids)] = ids
        return out

    @property
    def valid(self) -> np.ndarray:
        n = np.array([len(self.field_ids(f)) for f in range(len(self.ranges))])
        return np.arange(self.width)[None, :] < n[:, None]

    def positions(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Global ids [B, F] -> (their candidate positions int32 [B, F], bool [B, F]: the id is
        a candidate of its field; where not, the position is 0 and means nothing)."""
        tokens = jnp.asarray(tokens)
        start = jnp.asarray([a for a, _ in self.ranges], tokens.dtype)
        stop = jnp.asarray([b for _, b in self.ranges], tokens.dtype)
        in_range = (tokens >= start) & (tokens < stop)
        pos = jnp.where(in_range, len(SCORED_SPECIALS) + tokens - start, 0)
        known = in_range
        for j, special in enumerate(SCORED_SPECIALS):
            pos = jnp.where(tokens == special, j, pos)
            known = known | (tokens == special)
        return pos.astype(jnp.int32), known


def field_group(keywords: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """bool [F] mask of the fields named in `names`, F = len(keywords) (schema order)."""
    unknown = sorted(set(names) - set(keywords))
    if unknown:
        raise ValueError(f"fields not in the schema: {unknown}")
    return np.isin(np.asarray(keywords), np.asarray(names))


def restricted_log_softmax(logits: jax.Array, allowed) -> jax.Array:
    """log_softmax of [B, F, V] logits with each field limited to its allowed ids (bool [F, V];
    or of [B, F, C] candidate logits limited to the valid ones, `FieldCandidates.valid`).

    Ids outside a field's set get probability exactly 0 (their log-probability is about -1e30,
    finite so that nothing downstream turns into NaN). Computed in float32.
    """
    logits = jnp.where(jnp.asarray(allowed), logits.astype(jnp.float32), MASKED_LOGIT)
    return jax.nn.log_softmax(logits, axis=-1)


def sample_field_mask(
    rng: jax.Array, batch: int, num_fields: int, rate: float, min_fields: int = 1
) -> jax.Array:
    """Random fields to hide and predict: bool [batch, num_fields], True = masked.

    Each field is masked independently with probability `rate`; items left with fewer than
    `min_fields` masked fields get their lowest-noise fields added, so every item has at least
    `min_fields` targets (an item without any would contribute nothing to the loss).
    """
    if not 0 <= min_fields <= num_fields:
        raise ValueError(f"min_fields={min_fields} must be in [0, {num_fields}]")
    noise = jax.random.uniform(rng, (batch, num_fields))
    mask = noise < rate
    if min_fields:
        kth_smallest = -jax.lax.top_k(-noise, min_fields)[0][:, -1:]
        mask |= noise <= kth_smallest
    return mask


def apply_field_mask(
    tokens: jax.Array, values: jax.Array, value_mask: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hide the masked fields from the model input: MASK token, value 0, value absent.

    tokens [B, F] int, values [B, F] float, value_mask [B, F] bool or 0/1 ints (as the tokenizer
    writes it), mask [B, F] or [F] bool. Returns the three inputs, dtypes kept, masked fields
    hidden.
    """
    mask = jnp.asarray(mask, bool)
    value_mask = jnp.asarray(value_mask)
    return (
        jnp.where(mask, MASK, tokens),  # a Python int is weakly typed: tokens keep their dtype
        jnp.where(mask, 0, values),
        (value_mask.astype(bool) & ~mask).astype(value_mask.dtype),
    )


def masked_protocol_loss(
    logits: jax.Array,
    numeric_pred: jax.Array,
    tokens: jax.Array,
    values: jax.Array,
    value_mask: jax.Array,
    predict_mask: jax.Array,
    allowed,
    numeric_weight: float = 1.0,
    *,
    axis_name: AxisName | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross entropy on the predicted fields' tokens plus MSE on their numeric values.

    logits: the model's token logits, [B, F, C] over each field's candidates when `allowed` is
    a `FieldCandidates` (what the heads give), or [B, F, V] over the whole vocabulary when it is
    the bool [F, V] of `allowed_targets`. numeric_pred [B, F]: its value predictions.
    tokens [B, F] int: the true ids. values [B, F]: true normalised values (may be NaN where
    value_mask is false). value_mask [B, F] bool or 0/1: the field has a numeric value.
    predict_mask [B, F] bool: the fields hidden from the model and to be predicted.
    allowed: `FieldCandidates`, or bool [F, V] from `allowed_targets`.
    axis_name: inside shard_map, the batch axis (or axes) to average over globally.

    The cross entropy (each field's softmax restricted to its allowed ids) is averaged over
    predicted fields whose true id is allowed: a PAD target, e.g. an all-PAD filler row, is left
    out rather than costing 1e30; `n_targets` in the metrics counts what was scored. The MSE is
    averaged over predicted fields that have a value. Returns (ce + numeric_weight * mse,
    metrics: loss, ce, mse, accuracy (argmax over the allowed ids, on the scored fields),
    n_targets).
    """
    predict_mask = jnp.asarray(predict_mask, bool)
    if isinstance(allowed, FieldCandidates):
        logp = restricted_log_softmax(logits, allowed.valid)
        targets, known = allowed.positions(tokens)
    else:
        allowed = jnp.asarray(allowed, bool)
        logp = restricted_log_softmax(logits, allowed)
        targets, known = tokens, allowed[jnp.arange(tokens.shape[-1]), tokens]
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    scored = predict_mask & known
    ce = masked_mean(-target_logp, scored, axis_name)
    accuracy = masked_mean(jnp.argmax(logp, axis=-1) == targets, scored, axis_name)

    has_value = predict_mask & jnp.asarray(value_mask, bool)
    # Zero the targets where there is no value first: a NaN there would turn the gradient of the
    # squared error into NaN even though the mask drops its value.
    diff = numeric_pred.astype(jnp.float32) - jnp.where(has_value, values, 0.0)
    mse = masked_mean(jnp.square(diff), has_value, axis_name)

    n_targets = jnp.sum(scored, dtype=jnp.float32)
    if axis_name is not None:
        n_targets = jax.lax.psum(n_targets, axis_name)
    loss = ce + numeric_weight * mse
    return loss, {"loss": loss, "ce": ce, "mse": mse, "accuracy": accuracy, "n_targets": n_targets}


def translation_loss(
    logits: jax.Array,
    numeric_pred: jax.Array,
    tokens: jax.Array,
    values: jax.Array,
    value_mask: jax.Array,
    group,
    allowed,
    numeric_weight: float = 1.0,
    *,
    axis_name: AxisName | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Protocol-protocol translation: predict a fixed group of fields from the others.

    Same as `masked_protocol_loss` with predict_mask = group ([F] bool, e.g. `field_group(
    schema.keywords, pgjax.objectives.DEVICE_FIELDS)`) for every item; the model input should
    have that group hidden (`apply_field_mask`). Returns (loss, metrics).
    """
    predict_mask = jnp.broadcast_to(jnp.asarray(group, dtype=bool), tokens.shape)
    return masked_protocol_loss(
        logits,
        numeric_pred,
        tokens,
        values,
        value_mask,
        predict_mask,
        allowed,
        numeric_weight,
        axis_name=axis_name,
    )
