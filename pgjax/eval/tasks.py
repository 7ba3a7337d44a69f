"""Downstream tasks: their definition, the label join, and label fractions drawn by patient.

Labels are keyed by study UID, which is PHI-adjacent, so they never meet the store as UIDs: each
UID is hashed with the store's private salt (`pgjax.data.deid.hash_key`, the same key the store's
tables carry) and joined on that key. Without a labels file, the store's own `task`/`label`
columns are used (written by `pgjax preprocess --labels`, joined the same way).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np

from pgjax.data.store import open_store

UNITS = ("study", "item")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    label: str
    group: str = "images"
    unit: str = "study"
    train_splits: tuple[str, ...] = ("train",)
    val_splits: tuple[str, ...] = ("val",)
    test_splits: tuple[str, ...] = ("test", "external")
    label_fractions: tuple[float, ...] = (0.01, 0.1, 0.2, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Each external site its own test split, "external:<site>" (the pooled "external" is then
    # not reported): sites of different shift types must not be averaged into one number.
    external_by_site: bool = False
    # Protocol fields (store tokens) whose values define the strata of the within-stratum AUROC
    # and of the representation diagnostics.
    strata: tuple[str, ...] = ("ViewPosition",)

    def __post_init__(self):
        problems = []
        if self.group not in ("images", "volumes"):
            problems.append(f"group must be images or volumes, not {self.group!r}")
        if self.unit not in UNITS:
            problems.append(f"unit must be one of {UNITS}, not {self.unit!r}")
        bad = [f for f in self.label_fractions if not 0.0 < float(f) <= 1.0]
        if bad or not self.label_fractions:
            problems.append(f"label fractions must be in (0, 1]: {list(self.label_fractions)}")
        if not self.seeds:
            problems.append("at least one seed is needed")
        bad = [f for f in self.strata if not isinstance(f, str) or not f]
        if bad:
            problems.append(f"strata must be protocol field names, not {list(self.strata)}")
        if problems:
            raise ValueError(f"task {self.name}: " + "; ".join(problems))


def task_from_config(tasks_config, name: str) -> TaskSpec:
    tasks = tasks_config.tasks
    if name not in tasks:
        raise KeyError(f"no task {name!r} in the tasks config; known: {sorted(tasks)}")
    t = dict(tasks[name])
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(t) - fields)
    if unknown:
        raise KeyError(f"task {name}: unknown keys {unknown}; known {sorted(fields - {'name'})}")
    for key in ("train_splits", "val_splits", "test_splits", "seeds", "strata"):
        if key in t:
            t[key] = tuple(t[key])
    if "label_fractions" in t:
        t["label_fractions"] = tuple(float(f) for f in t["label_fractions"])
    return TaskSpec(name=name, **t)


# ---------------------------------------------------------------------------------------------
# The items of a task


@dataclasses.dataclass
class TaskItems:
    """The usable, labelled items of a task: store rows and their table columns (arrays)."""

    task: TaskSpec
    rows: np.ndarray  # int64 store rows
    columns: dict[str, np.ndarray]  # site, vendor, modality, patient_key, study_key, split...
    labels: np.ndarray  # int8 0/1
    join: dict  # counts of the label join (no identifiers)
    # The finding's true latent (float, NaN where unknown), or None with the reason.
    scores: np.ndarray | None = None
    scores_reason: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, splits) -> np.ndarray:
        """Items of these splits; "external" also names each per-site "external:<site>"."""
        split = self.columns["split"]
        base = np.array([s.partition(":")[0] for s in split], dtype=object)
        return np.flatnonzero(np.isin(split, list(splits)) | np.isin(base, list(splits)))


def read_label_file(path: str | Path, task: str, salt: bytes) -> tuple[dict[str, int], dict]:
    """{salted study key: 0/1} of the rows of labels.csv for this task, and join counts.

    A row with a label other than 0/1 is an error naming the line (a silent skip would change
    the prevalence).
    """
    labels, _, counts = read_label_file_with_scores(path, task, salt)
    return labels, counts


def read_label_file_with_scores(
    path: str | Path, task: str, salt: bytes
) -> tuple[dict[str, int], dict[str, float] | None, dict]:
    """As read_label_file, plus {salted study key: score} from the optional `score` column
    (None when the file has none). A score that is not a number is an error naming the line."""
    from pgjax.data.deid import hash_key

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such labels file")
    out: dict[str, int] = {}
    scores: dict[str, float] | None = None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"study_uid", "task", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: labels file lacks columns {sorted(missing)}")
        if "score" in (reader.fieldnames or ()):
            scores = {}
        for line, row in enumerate(reader, start=2):
            if (row["task"] or "").strip() != task:
                continue
            label = (row["label"] or "").strip()
            if label not in ("0", "1"):
                raise ValueError(f"{path}:{line}: label must be 0 or 1 for a binary task")
            uid = (row["study_uid"] or "").strip()
            if not uid:
                raise ValueError(f"{path}:{line}: empty study_uid")
            key = hash_key(salt, "study", uid)
            out[key] = int(label)
            if scores is not None:
                scores[key] = _score(row["score"], f"{path}:{line}")
    return out, scores, {"label_rows": len(out)}


def _score(text: str | None, where: str) -> float:
    """A latent score; empty means unknown (NaN)."""
    text = (text or "").strip()
    if not text:
        return math.nan
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}: score must be a number, not {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: score must be finite, not {text!r}")
    return v


def load_items(
    store: str | Path,
    task: TaskSpec,
    *,
    labels: str | Path | None = None,
    salt_file: str | Path | None = None,
) -> TaskItems:
    """The task's items: ok rows of the store group whose study has a label for the task."""
    store = Path(store)
    table = open_store(store).group(task.group).table()
    ok = table["ok"] == "1"
    study = table["study_key"]
    join: dict = {"store_items": int(len(ok)), "not_ok": int((~ok).sum())}
    if labels is not None:
        from pgjax.data.deid import load_or_create_salt
        from pgjax.data.preprocess import default_private

        salt_path = Path(salt_file) if salt_file else default_private(store) / "salt"
        if not salt_path.exists():
            raise FileNotFoundError(
                f"{salt_path}: the store's salt is needed to join labels by study (give "
                "--salt-file)"
            )
        salt = load_or_create_salt(salt_path, forbidden_root=store)
        by_study, score_of, counts = read_label_file_with_scores(labels, task.label, salt)
        join.update(counts, source="labels file joined by salted study key")
        has = np.array([k in by_study for k in study])
        y = np.array([by_study.get(k, -1) for k in study], dtype=np.int64)
        join["label_studies_not_in_store"] = len(set(by_study) - set(study[ok]))
        if score_of is None:
            scores, scores_reason = None, f"{Path(labels).name} has no score column"
        else:
            scores = np.array([score_of.get(k, math.nan) for k in study], dtype=np.float64)
            scores_reason = ""
    else:
        has = (table["task"].astype(str) == task.label) & np.isin(
            table["label"].astype(str), ["0", "1"]
        )
        y = np.where(has, table["label"].astype(str) == "1", -1).astype(np.int64)
        join["source"] = "store table (labels joined by preprocess)"
        if "score" in table:
            # Only this task's rows: another task's scores are none of its business.
            scores = np.array([_score(v, f"{store}/{task.group}/table.csv score") if h else math.nan
                               for v, h in zip(table["score"], has, strict=True)],
                              dtype=np.float64)  # fmt: skip
            scores_reason = ""
        else:
            scores, scores_reason = None, "the store's table has no score column"
    keep = ok & has
    join["items"] = int(keep.sum())
    join["studies"] = int(len(set(study[keep])))
    if not keep.any():
        raise ValueError(
            f"{store}: no usable {task.group} item has a label for task {task.label!r}"
            + ("" if labels else " (give --labels, or preprocess with --labels)")
        )
    columns = {k: v[keep] for k, v in table.items()}
    if task.external_by_site:
        split = columns["split"].astype(object)
        ext = split == "external"
        split[ext] = ["external:" + s for s in columns["site"][ext]]
        columns["split"] = split.astype(str)
    if scores is not None:
        scores = scores[keep]
        if np.isnan(scores).all():
            scores, scores_reason = None, "no labelled item has a score"
    return TaskItems(task, table["row"][keep].astype(np.int64), columns, y[keep].astype(np.int8),
                     join, scores, scores_reason)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Label fractions


def patient_labels(patients: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """A patient's label for stratification: 1 if any of their items is positive."""
    out: dict[str, int] = {}
    for p, y in zip(patients, labels, strict=True):
        out[p] = max(out.get(p, 0), int(y))
    return out


def fraction_patients(patients: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """The training patients kept at this label fraction and seed, as a sorted array.

    Drawn at patient level, stratified by patient label, at least one patient per class (a
    one-class training set cannot fit a classifier). Nested: for one seed, each class's patients
    are taken in one fixed random order, so a smaller fraction is a subset of a larger one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], not {fraction}")
    by_patient = patient_labels(patients, labels)
    kept: list[str] = []
    for cls in (0, 1):
        group = sorted(p for p, y in by_patient.items() if y == cls)
        if not group:
            continue
        rng = np.random.default_rng([seed, cls, 0x5EED])
        order = [group[i] for i in rng.permutation(len(group))]
        k = min(len(group), max(1, math.ceil(fraction * len(group) - 1e-9)))
        kept.extend(order[:k])
    return np.array(sorted(kept))


def describe(items: TaskItems) -> dict:
    """Counts per split (items, studies, patients, positives) for the report; no identifiers."""
    out = {}
    for split in sorted(set(items.columns["split"])):
        idx = items.where([split])
        out[split] = {
            "items": int(len(idx)),
            "studies": int(len(set(items.columns["study_key"][idx]))),
            "patients": int(len(set(items.columns["patient_key"][idx]))),
            "positive_items": int(items.labels[idx].sum()),
            "sites": dict(sorted(Counter(items.columns["site"][idx]).items())),
        }
    return out
