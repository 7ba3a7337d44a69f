"""What every objective term shares: the protocol vocabulary's description, the interface of a
term, and the runner that applies the models' parts to their slices of one variables tree."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from pgjax.losses import protocol as ploss
from pgjax.objectives.defaults import FieldGroup, is_group
from pgjax.train.mesh import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class ProtocolInfo:
    """What the objectives need to know of the protocol vocabulary.

    keywords: the F field names, in token-column order. field_ranges: per field, its half-open
    [start, stop) range of global token ids. vocab_size: V, the number of token ids (specials
    included). text_fields: the free-text fields (the schema's `freetext`: descriptions,
    protocol names), which name acquisition settings in words and are hidden where they would
    give a target away.
    """

    keywords: tuple[str, ...]
    field_ranges: tuple[tuple[int, int], ...]
    vocab_size: int
    text_fields: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "field_ranges", tuple(tuple(r) for r in self.field_ranges))
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        if len(self.keywords) != len(self.field_ranges):
            raise ValueError("keywords and field_ranges must have one entry per field")
        unknown = sorted(set(self.text_fields) - set(self.keywords))
        if unknown:
            raise ValueError(f"text_fields {unknown} are not among the keywords")

    @property
    def text_mask(self) -> np.ndarray:
        """bool [F]: the free-text fields."""
        return np.isin(np.asarray(self.keywords), np.asarray(self.text_fields, dtype=str))

    @property
    def num_fields(self) -> int:
        return len(self.keywords)

    @classmethod
    def from_vocabulary(cls, vocab) -> ProtocolInfo:
        """From a `pgjax.data.tokenizer.Vocabulary`."""
        return cls(
            keywords=tuple(vocab.keywords),
            field_ranges=tuple(tuple(r) for r in vocab.field_ranges),
            vocab_size=int(vocab.size),
            text_fields=tuple(f.keyword for f in vocab.schema.fields if f.freetext),
        )


def as_dict(x) -> dict:
    if x is None:
        return {}
    return dict(x.to_dict() if hasattr(x, "to_dict") else x)


def takes_train(module: nn.Module) -> bool:
    """Whether the module's __call__ has a `train` flag (ProjectionHead has none)."""
    return "train" in inspect.signature(type(module).__call__).parameters


def field_mask(info: ProtocolInfo, names: Sequence[str], what: str) -> np.ndarray:
    """bool [F] mask of the named fields. A field group (a default, or a group a config uses,
    also once read back from config.json as a list) drops the names the schema lacks (a custom
    schema may lack some); names listed by hand must all exist."""
    if isinstance(names, FieldGroup) or is_group(names):
        names = [n for n in names if n in info.keywords]
    try:
        mask = ploss.field_group(info.keywords, tuple(names))
    except ValueError as e:
        raise ValueError(f"config.objectives.{what}: {e}") from None
    if not mask.any():
        raise ValueError(f"config.objectives.{what}: none of its fields is in the schema")
    return mask


@dataclasses.dataclass(frozen=True)
class Context:
    """What a term is built from: the protocol vocabulary, the mesh (None: dense single-device
    losses), the compute dtype, the model config section, the image encoder and each field's
    candidate target ids (`FieldCandidates`: the heads score a field against its own only)."""

    info: ProtocolInfo
    mesh: jax.sharding.Mesh | None
    dtype: object
    model: dict
    image_encoder: nn.Module
    allowed: ploss.FieldCandidates

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)


@dataclasses.dataclass
class Inputs:
    """One loss call's inputs: the batch, the base-augmented images, the image encoder's
    features of them (None when no term reads them) and one random key per use."""

    batch: dict
    images: jax.Array
    feats: dict | None
    keys: dict


@dataclasses.dataclass
class InitInputs:
    """What `Term.init` reads: one item of the batch, the encoders' outputs on it, `part(name,
    *args, module=None)` to initialise a part and return its output, and `key()` for a fresh
    random key."""

    one: dict
    feats: dict
    protocol: dict | None
    part: Callable
    key: Callable


class Term:
    """One loss term. `heads()` are the parts it adds to the image (and protocol) encoder,
    `init` initialises them (and returns parameters that are no module's, like a temperature),
    `loss` is the term's value and metrics, a pure function of the parameters (through `run`)
    and the inputs. A term with an adversary (CE+DCM's discriminator, params["disc"]) returns
    the adversary's loss as metrics["disc/loss"]: the objective adds it, unweighted, to the
    value it differentiates, and the term keeps the two players' gradients apart (CE+DCM:
    stop_gradient and gradients computed in the forward pass, see objectives/ce_dcm.py)."""

    name: str = ""
    uses_protocol = False  # needs the protocol encoder
    reads_features = False  # reads the encoder's features of the base-augmented image

    def __init__(self, settings: dict, ctx: Context):
        self.settings = settings
        self.ctx = ctx

    @property
    def weight(self) -> float:
        return self.settings["weight"]

    def heads(self) -> dict[str, nn.Module]:
        return {}

    def init(self, init: InitInputs) -> dict:
        return {}

    def loss(self, run: Runner, inputs: Inputs) -> tuple[jax.Array, dict]:
        raise NotImplementedError


class Runner:
    """Applies the objective's parts to their slices of one variables tree.

    Non-param collections (BatchNorm statistics, spectral-norm vectors) are threaded from call
    to call, so a part applied twice in one step (e.g. the encoder on the image and on SimCLR's
    views) updates its running statistics twice, in order; `collections()` returns them all.
    """

    def __init__(self, parts: dict, variables: dict, *, train: bool, rng: jax.Array | None):
        self.parts = parts
        self.params = variables["params"]
        self.state = {col: dict(tree) for col, tree in variables.items() if col != "params"}
        self.train = train
        self.rng = rng
        self.calls = 0

    def __call__(self, name, *args, module=None, params=None, train=None, **kwargs):
        """Apply part `name` (or `module`, a variant of it with the same parameters) with its
        parameters (or `params`). `train` defaults to the runner's; in training mode the part's
        collections are mutable and get updated."""
        params = self.params[name] if params is None else params
        out, updated = self._apply(name, module, params, args, kwargs, train)
        self._update(name, updated)
        return out

    def vjp(self, name, x, *args, module=None, params=None, train=None, **kwargs):
        """Apply part `name` to `x` (and `args`) as `__call__` does, and return (output,
        vjp_fn): vjp_fn maps a cotangent of the output to those of (x, the part's params)."""
        params = self.params[name] if params is None else params

        def apply(x, p):
            return self._apply(name, module, p, (x, *args), kwargs, train)

        out, vjp_fn, updated = jax.vjp(apply, x, params, has_aux=True)
        self._update(name, updated)
        return out, vjp_fn

    def _apply(self, name, module, params, args, kwargs, train):
        """(output, updated collections or {}): the part applied, with no side effect."""
        module = self.parts[name] if module is None else module
        train = self.train if train is None else train
        variables = {"params": params}
        variables.update({col: tree[name] for col, tree in self.state.items() if name in tree})
        kwargs = dict(kwargs)
        if takes_train(module):
            kwargs["train"] = train
        rngs = None
        if train and self.rng is not None:
            self.calls += 1  # every call its own dropout key
            rngs = {"dropout": jax.random.fold_in(self.rng, self.calls)}
        mutable = [col for col in variables if col != "params"] if train else False
        if not mutable:
            return module.apply(variables, *args, rngs=rngs, **kwargs), {}
        return module.apply(variables, *args, rngs=rngs, mutable=mutable, **kwargs)

    def _update(self, name, updated):
        for col, tree in updated.items():
            self.state[col][name] = tree

    def collections(self) -> dict:
        return self.state
