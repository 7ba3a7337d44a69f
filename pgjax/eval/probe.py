"""Downstream heads: a linear probe on frozen embeddings, and full fine-tuning of the encoder.

Linear probe: L2-regularised logistic regression on embeddings standardised with the training
subset's mean and standard deviation, fitted exactly (L-BFGS on the convex loss, so the result
does not depend on a seed). The penalty is chosen on the validation split by log-loss (defined
even for a handful of cases, unlike AUROC); when the validation split lacks a class, by
patient-grouped cross-validation on the training subset instead.

Full fine-tuning: the image encoder and a logistic head, trained with AdamW for a fixed number
of steps (small encoder learning rate, larger head learning rate), the head starting from the
linear probe's solution (LP-FT, Kumar et al. 2022: a random head would distort the pretrained
features in its first steps). The encoder runs in eval mode (dropout off, BatchNorm statistics
frozen). The step with the lowest validation log-loss is kept. One jitted update, one jitted
predict: batches have a fixed size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit


@dataclasses.dataclass
class LinearProbe:
    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray
    b: float
    l2: float
    selection: str  # how l2 was chosen

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return expit(self.logits(x))

    def raw_head(self) -> tuple[np.ndarray, float]:
        """(w, b) acting on unstandardised embeddings: the fine-tuning head's start."""
        w = self.w / self.scale
        return w, float(self.b - (self.mean / self.scale) @ self.w)


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    # log(1 + e^z) - y z, stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """argmin_w,b mean log-loss + l2/2 |w|^2 (the bias is not penalised)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, d = x.shape

    def f(theta):
        w, b = theta[:d], theta[d]
        z = x @ w + b
        r = expit(z) - y
        loss = _log_loss(y, z) + 0.5 * l2 * w @ w
        grad = np.concatenate([x.T @ r / n + l2 * w, [r.mean()]])
        return loss, grad

    p = np.clip(y.mean(), 1e-3, 1 - 1e-3)
    theta0 = np.concatenate([np.zeros(d), [np.log(p / (1 - p))]])
    res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:d], float(res.x[d])


def _standardise(x):
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-6, scale, 1.0)


def _two_classes(y) -> bool:
    return len(y) >= 2 and 0 < int(np.sum(y)) < len(y)


def train_linear_probe(
    x_train, y_train, groups_train, x_val, y_val, l2_grid, *, folds: int = 5
) -> LinearProbe:
    """Fit on the training subset with the penalty that minimises validation log-loss."""
    if not _two_classes(y_train):
        raise ValueError("the training subset has one class only; no classifier can be fitted")
    mean, scale = _standardise(x_train)
    xs = (x_train - mean) / scale
    grid = sorted(float(v) for v in l2_grid)
    if _two_classes(y_val):
        xv = (x_val - mean) / scale
        losses = []
        for l2 in grid:
            w, b = fit_logistic(xs, y_train, l2)
            losses.append(_log_loss(y_val, xv @ w + b))
        selection = "validation log-loss"
    else:
        losses = _grouped_cv_losses(xs, y_train, groups_train, grid, folds)
        selection = "patient-grouped cross-validation on the training subset (validation split " \
                    "lacks a class)"  # fmt: skip
    # Ties go to the stronger penalty (the last of equal minima in ascending order).
    best = max(i for i, v in enumerate(losses) if v <= min(losses) + 1e-12)
    w, b = fit_logistic(xs, y_train, grid[best])
    return LinearProbe(mean, scale, w, b, grid[best], selection)


def patient_folds(groups: np.ndarray, k: int) -> np.ndarray:
    """Fold (0..k-1) of each item: whole patients, dealt round-robin in a fixed random order."""
    patients = np.unique(groups)
    fold_of = {p: i % k for i, p in enumerate(np.random.default_rng(0).permutation(patients))}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _grouped_cv_losses(xs, y, groups, grid, folds) -> list[float]:
    k = int(min(folds, len(np.unique(groups))))
    if k < 2:
        return [0.0 for _ in grid]  # one patient: nothing to validate on; the strongest wins
    fold = patient_folds(groups, k)
    losses = np.zeros(len(grid))
    for f in range(k):
        tr, va = fold != f, fold == f
        if not _two_classes(y[tr]):
            continue
        for i, l2 in enumerate(grid):
            w, b = fit_logistic(xs[tr], y[tr], l2)
            losses[i] += _log_loss(y[va], xs[va] @ w + b) * va.sum()
    return list(losses / len(y))


# ---------------------------------------------------------------------------------------------
# Full fine-tuning


@dataclasses.dataclass
class FinetuneResult:
    probs: np.ndarray  # test probabilities
    best_step: int
    val_losses: dict  # step -> validation log-loss


def finetune(
    embedder,
    train_rows: np.ndarray,
    y_train: np.ndarray,
    val_rows: np.ndarray,
    y_val: np.ndarray,
    test_rows: np.ndarray,
    head_init: tuple[np.ndarray, float],
    *,
    steps: int,
    batch: int,
    lr: float,
    head_lr: float,
    weight_decay: float,
    eval_every: int,
    seed: int,
    with_protocol: bool = False,
) -> FinetuneResult:
    """Fine-tune the embedder's image encoder with a logistic head; see the module docstring.

    with_protocol: the head also reads the (frozen) protocol encoder's embedding, concatenated
    after the image embedding; head_init then comes from the `linear+protocol` probe."""
    import jax
    import jax.numpy as jnp
    import optax

    objective = embedder.objective
    variables = embedder.variables
    frozen = {k: v for k, v in variables["params"].items() if k != "image_encoder"}
    state = {k: v for k, v in variables.items() if k != "params"}
    w0, b0 = head_init
    params = {
        "encoder": jax.tree.map(jnp.asarray, variables["params"]["image_encoder"]),
        "head": {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)},
    }
    labels_tree = {"encoder": jax.tree.map(lambda _: "encoder", params["encoder"]),
                   "head": {"w": "head", "b": "head"}}  # fmt: skip
    tx = optax.multi_transform(
        {"encoder": optax.adamw(lr, weight_decay=weight_decay), "head": optax.adam(head_lr)},
        labels_tree,
    )

    def logits(p, inputs):
        v = {"params": {**frozen, "image_encoder": p["encoder"]}, **state}
        features = objective.embed_images(v, inputs["image"])
        if with_protocol:
            protocol = objective.embed_protocol(
                variables, inputs["tokens"], inputs["values"], inputs["value_mask"]
            )
            features = jnp.concatenate([features, protocol], axis=-1)
        return features @ p["head"]["w"] + p["head"]["b"]

    def loss_fn(p, inputs, y):
        z = logits(p, inputs)
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    @jax.jit
    def update(p, opt_state, inputs, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, inputs, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    predict = jax.jit(logits)

    def probs_of(p, rows):
        out = [np.asarray(predict(p, inputs))[:n] for inputs, n in embedder.batches(rows, batch)]
        return expit(np.concatenate(out)) if out else np.zeros(0)

    opt_state = tx.init(params)
    rng = np.random.default_rng([seed, 0xF7])
    y_train = np.asarray(y_train, np.float32)
    val_losses: dict[int, float] = {}
    best = (np.inf, 0, params)
    has_val = _two_classes(y_val)

    def check(step, p):
        nonlocal best
        if not has_val:
            best = (np.nan, step, p)  # no validation signal: the last step is kept
            return
        pv = np.clip(probs_of(p, val_rows), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y_val * np.log(pv) + (1 - y_val) * np.log(1 - pv)))
        val_losses[step] = loss
        if loss < best[0]:
            best = (loss, step, p)

    check(0, params)
    for step in range(1, steps + 1):
        pick = rng.integers(0, len(train_rows), size=batch)
        inputs = embedder.read(np.asarray(train_rows)[pick])
        params, opt_state, _ = update(params, opt_state, inputs, y_train[pick])
        if step % eval_every == 0 or step == steps:
            check(step, params)
    _, best_step, best_params = best
    return FinetuneResult(probs_of(best_params, test_rows), best_step, val_losses)
