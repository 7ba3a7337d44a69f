"""Evaluation: label join, label fractions, probes, protocol border, predictions -> metrics,
the recompute tool, the report, card and commands.

One small synthetic corpus (radiographs, 4 sites, site_d external) and one tiny Protocol Genome
checkpoint trained for a few steps are shared by the module; the rest is NumPy. The slow tests
(fine-tuning, a sweep) are marked.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgjax.eval import probe as probe_lib
from pgjax.eval.tasks import TaskSpec, fraction_patients, load_items, read_label_file

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "recompute_metrics.py"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pgjax.synth.corpus import write_corpus

    out = tmp_path_factory.mktemp("eval_corpus")
    write_corpus(out, studies=90, seed=3, modality_mix=(1.0, 0.0, 0.0, 0.0), radiograph_size=48)
    return out


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("eval_store")
    out = root / "store"
    # A fixed salt (kept outside the store, as always): the patient-level splits are then the
    # same on every run.
    (root / "salt").write_text("5a" * 32 + "\n")
    cfg = PreprocessConfig(image_size=(32, 32), min_patients=2, external_sites=("site_d",),
                           split_fractions=(0.6, 0.2, 0.2))  # fmt: skip
    sites = {d.name: d.name for d in (corpus / "dicom").iterdir() if d.is_dir()}
    preprocess([corpus / "dicom"], out, cfg=cfg, labels=corpus / "labels.csv", workers=1,
               salt_file=root / "salt", site_names=sites)  # fmt: skip
    return out


def salt_of(store):
    return store.parent / "salt"


@pytest.fixture(scope="module")
def pg_workdir(store, tmp_path_factory):
    """configs/pg.py:tiny, 2 steps: the checkpoint every model-level test reuses."""
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import train

    workdir = tmp_path_factory.mktemp("eval_models") / "pg"
    config = load_config(REPO / "configs" / "pg.py:tiny",
                         [f"input.store={store}", "input.global_batch=8", "total_steps=2",
                          "log_every=1", "checkpoint_every=2"])  # fmt: skip
    train(config, workdir)
    return workdir


# Each external site its own split, as configs/tasks.py sets for cardiomegaly.
TASK = TaskSpec("cardiomegaly", "cardiomegaly", label_fractions=(0.5, 1.0), seeds=(0, 1),
                external_by_site=True)  # fmt: skip
EXT = "external:site_d"


@pytest.fixture(scope="module")
def evaluation(store, corpus, pg_workdir, tmp_path_factory):
    from pgjax.eval.embed import Model
    from pgjax.eval.evaluate import EvalSettings, evaluate

    out = tmp_path_factory.mktemp("eval_out") / "cardiomegaly"
    models = [Model("pg", pg_workdir), Model("random_init", pg_workdir, random_init=True)]
    # Protocol calibration with a small minimum group, so that some groups get their own
    # temperature and others fall back to the global one.
    settings = EvalSettings(heads=("linear", "linear+protocol"), n_boot=50, subgroup_boot=20,
                            calibrate="protocol", calibration_min_count=3)  # fmt: skip
    metrics = evaluate(models, TASK, store, out, settings, labels=corpus / "labels.csv",
                       salt_file=salt_of(store))  # fmt: skip
    return out, metrics


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Label join and fractions


def test_labels_join_through_the_salted_study_key(store, corpus):
    joined = load_items(store, TASK, labels=corpus / "labels.csv", salt_file=salt_of(store))
    from_store = load_items(store, TASK)  # the store's own columns, joined by preprocess
    np.testing.assert_array_equal(joined.rows, from_store.rows)
    np.testing.assert_array_equal(joined.labels, from_store.labels)
    # The keys are HMACs of the UIDs under the store's salt: no UID reaches the join's result.
    uids = {r["study_uid"] for r in read_csv(corpus / "labels.csv")}
    assert not uids & set(joined.columns["study_key"])
    assert joined.join["label_studies_not_in_store"] == 0
    assert set(joined.columns["split"]) >= {"train", EXT}
    # The true latent score joins the same way (labels file) or comes with the store's table.
    assert joined.scores is not None and not np.isnan(joined.scores).any()
    np.testing.assert_array_equal(joined.scores, from_store.scores)


def test_label_join_errors_name_the_file(store, corpus, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("study_uid,task,label\n1.2.3,cardiomegaly,0\n1.2.4,cardiomegaly,yes\n")
    with pytest.raises(ValueError, match=r"labels.csv:3: label must be 0 or 1"):
        read_label_file(bad, "cardiomegaly", b"s" * 32)
    bad.write_text(
        "study_uid,task,label,score\n1.2.3,cardiomegaly,0,0.41\n1.2.4,cardiomegaly,1,x\n"
    )
    with pytest.raises(ValueError, match=r"labels.csv:3: score must be a number, not 'x'"):
        read_label_file(bad, "cardiomegaly", b"s" * 32)
    with pytest.raises(FileNotFoundError, match="salt"):
        load_items(store, TASK, labels=corpus / "labels.csv", salt_file=tmp_path / "nosalt")
    with pytest.raises(ValueError, match="no usable images item has a label for task 'nope'"):
        load_items(store, TaskSpec("x", "nope"))


def test_label_fractions_are_patient_level_stratified_nested_and_seeded():
    rng = np.random.default_rng(0)
    patients = np.array([f"p{i // 3:03d}" for i in range(300)])  # 3 items per patient
    by_patient = rng.random(100) < 0.2
    labels = np.array([int(by_patient[i // 3]) for i in range(300)])
    small = fraction_patients(patients, labels, 0.1, seed=0)
    large = fraction_patients(patients, labels, 0.5, seed=0)
    assert set(small) <= set(large)  # nested
    assert np.array_equal(small, fraction_patients(patients, labels, 0.1, seed=0))
    assert not np.array_equal(small, fraction_patients(patients, labels, 0.1, seed=1))
    n_pos = int(by_patient.sum())
    pos = {f"p{i:03d}" for i in np.flatnonzero(by_patient)}
    assert len(set(small) & pos) == int(np.ceil(0.1 * n_pos))  # stratified by patient label
    assert len(set(small) - pos) == int(np.ceil(0.1 * (100 - n_pos)))
    tiny = fraction_patients(patients, labels, 0.001, seed=0)
    assert len(tiny) == 2 and len(set(tiny) & pos) == 1  # at least one patient per class
    assert len(fraction_patients(patients, labels, 1.0, seed=5)) == 100
    with pytest.raises(ValueError, match="label fraction"):
        fraction_patients(patients, labels, 0.0, seed=0)


# ---------------------------------------------------------------------------------------------
# Linear probe


def test_logistic_fit_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + rng.normal(size=200) > 0).astype(float)
    l2 = 0.05
    w, b = probe_lib.fit_logistic(x, y, l2)
    # sklearn: C * sum(log-loss) + |w|^2 / 2, i.e. ours with l2 = 1 / (C n).
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-4)
    np.testing.assert_allclose(b, ref.intercept_[0], atol=1e-4)


def test_probe_picks_the_penalty_on_validation_and_falls_back_to_grouped_cv():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 20))
    y = (x[:, 0] > 0).astype(float)
    groups = np.array([f"p{i // 2}" for i in range(120)])
    probe = probe_lib.train_linear_probe(x[:80], y[:80], groups[:80], x[80:], y[80:],
                                         (1e-3, 1e-1, 10.0))  # fmt: skip
    assert probe.selection == "validation log-loss"
    assert probe.l2 < 10.0  # a penalty that flattens the separable signal is not chosen
    from pgjax.eval.metrics import auroc

    assert auroc(y[80:], probe.predict(x[80:])) > 0.95
    one_class_val = np.zeros(40)
    cv = probe_lib.train_linear_probe(x[:80], y[:80], groups[:80], x[80:], one_class_val,
                                      (1e-3, 1e-1, 10.0))  # fmt: skip
    assert cv.selection.startswith("patient-grouped cross-validation")
    with pytest.raises(ValueError, match="one class"):
        probe_lib.train_linear_probe(x[:5], np.zeros(5), groups[:5], x, y, (1.0,))
    # raw_head acts on unstandardised embeddings exactly as the probe does on standardised ones
    w, b = probe.raw_head()
    np.testing.assert_allclose(x @ w + b, probe.logits(x), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# End to end: predictions -> metrics.json -> report, plots


def test_predictions_have_one_row_per_test_study_and_run(evaluation, store, corpus):
    out, metrics = evaluation
    rows = read_csv(out / "predictions.csv")
    from pgjax.eval.evaluate import PREDICTION_COLUMNS

    assert tuple(rows[0]) == PREDICTION_COLUMNS
    items = load_items(store, TASK)
    test = items.where(TASK.test_splits)
    n_studies = len(set(zip(items.columns["split"][test], items.columns["study_key"][test],
                            strict=True)))  # fmt: skip
    runs = {(r["model"], r["head"], r["label_fraction"], r["seed"]) for r in rows}
    # pg: linear and linear+protocol; random init has a (random) protocol encoder too; the
    # three feature reference rows (oracle, thumbnail, protocol_only) have the linear head only.
    # 0.5 with seeds 0 and 1, 1.0 with seed 0 only (the subset does not depend on the seed).
    assert len(runs) == 2 * 2 * 3 + 3 * 3
    assert {r[0] for r in runs} == {"pg", "random_init", "oracle", "thumbnail", "protocol_only"}
    assert len(rows) == len(runs) * n_studies
    assert {r["split"] for r in rows} == {"test", EXT}
    assert {r["stratum"] for r in rows} == {"ViewPosition=AP", "ViewPosition=PA"}
    assert all(0.0 <= float(r["prob"]) <= 1.0 for r in rows)
    uids = {r["study_uid"] for r in read_csv(corpus / "labels.csv")}
    assert not uids & {r["item_id"] for r in rows}
    assert metrics["predictions_rows"] == len(rows)


def test_metrics_json_is_recomputed_from_predictions_csv_by_scikit_learn(evaluation, tmp_path):
    out, _ = evaluation
    done = subprocess.run([sys.executable, str(TOOL), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "AGREE" in done.stdout
    # The tool can fail: one changed probability, with the digest fixed up, is caught.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("embeddings", "plots"))
    lines = (copy / "predictions.csv").read_text().splitlines()
    head, first = lines[0].split(","), lines[1].split(",")
    first[head.index("prob")] = "0.999"
    (copy / "predictions.csv").write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    m = json.loads((copy / "metrics.json").read_text())
    import hashlib

    m["predictions_sha256"] = hashlib.sha256((copy / "predictions.csv").read_bytes()).hexdigest()
    (copy / "metrics.json").write_text(json.dumps(m))
    done = subprocess.run([sys.executable, str(TOOL), str(copy)], capture_output=True, text=True)
    assert done.returncode == 1 and "DISAGREE" in done.stdout


def test_metrics_cover_splits_subgroups_border_and_paired_tests(evaluation):
    out, metrics = evaluation
    assert metrics["reference"] == "pg"
    runs = metrics["runs"]
    r = next(r for r in runs if r["model"] == "random_init" and r["split"] == EXT
             and r["head"] == "linear")  # fmt: skip
    assert set(r["subgroups"]) == {"site", "vendor", "scanner_model", "modality",
                                   "protocol_border", "stratum", "novel_decile"}  # fmt: skip
    assert set(r["subgroups"]["site"]) == {"site_d"}
    vs = r["vs_reference"]
    assert vs["reference"] == "pg"
    assert ("p_value" in vs) or ("reason" in vs)
    for run in runs:
        o = run["overall"]
        assert o["n"] == sum(s["n"] for s in run["subgroups"]["site"].values())
        if o["auroc"]["value"] is not None and o["auroc"]["lo"] is not None:
            assert o["auroc"]["lo"] <= o["auroc"]["value"] <= o["auroc"]["hi"]
    context = json.loads((out / "context.json").read_text())
    assert context["protocol_border"]["min_patients"] == 3
    seeds = [a for a in metrics["across_seeds"] if a["label_fraction"] == 0.5]
    assert seeds and all(a["seeds"] == [0, 1] for a in seeds)


def test_report_and_plots_are_written(evaluation):
    out, _ = evaluation
    report = (out / "report.md").read_text()
    for text in (f"## Results: {EXT} split", "## Results: test split", "AUROC [95% CI]",
                 "ECE-15", "Protocol-border", "Subgroups (bias audit)",
                 "plots/roc_reliability_external_site_d.png", "## Reference rows",
                 "## Sanity gate", "worst stratum AUROC", "Within each protocol stratum",
                 "## Representation diagnostics", "| oracle (ref. row) |"):  # fmt: skip
        assert text in report, text
    for name in ("roc_reliability_external_site_d", "auroc_vs_fraction_external_site_d",
                 "auroc_by_vendor_external_site_d", "roc_reliability_test"):  # fmt: skip
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_novelty_separates_the_site_with_an_unseen_vendor(evaluation, store, pg_workdir):
    """The done-when of protocol-shift detection: site_d (external) uses a vendor no training
    site has; the novelty score of its items against the training sites' AUROC > 0.9."""
    import pgjax.inference
    from pgjax.data.store import open_store
    from pgjax.eval.metrics import auroc

    out, metrics = evaluation
    table = open_store(store).images.table()
    ok = table["ok"] == "1"
    site_d = ok & (table["site"] == "site_d")
    training = ok & (table["site"] != "site_d")
    assert not set(table["vendor"][site_d]) & set(table["vendor"][training])  # the premise

    model = pgjax.inference.load(pg_workdir)
    rows = np.concatenate([table["row"][site_d], table["row"][training & (table["split"] !=
                                                                          "train")]])
    rows = rows.astype(np.int64)
    arrays = {n: open_store(store).images.array(n)[rows].read().result()
              for n in ("tokens", "values", "value_mask")}  # fmt: skip
    scored = model.protocol_novelty(arrays["tokens"], arrays["values"], arrays["value_mask"])
    external = np.arange(len(rows)) < int(site_d.sum())
    assert auroc(external, scored["novelty"]) > 0.9
    # The unseen vendor is named (as its token string: a value too rare for the vocabulary is
    # <unk>); no training-site item's Manufacturer is flagged.
    assert all(any(u.startswith("Manufacturer=") for u in lst)
               for lst in np.array(scored["unusual"], dtype=object)[external])  # fmt: skip
    assert not any(u.startswith("Manufacturer=") for lst in
                   np.array(scored["unusual"], dtype=object)[~external] for u in lst)  # fmt: skip
    # The record is cached with the checkpoint, and the same numbers come back from it.
    cached = list((pg_workdir / "protocol_stats").glob("step_2_*.npz"))
    assert len(cached) == 1
    again = pgjax.inference.load(pg_workdir).protocol_novelty(arrays["tokens"], arrays["values"],
                                                              arrays["value_mask"])
    np.testing.assert_allclose(again["novelty"], scored["novelty"], rtol=1e-6)

    # pgjax eval reports the same separation, and border vs typical, with intervals.
    nov = metrics["novelty"]
    assert nov["model"] == "pg"
    sep = nov["separation"]
    assert sep["external_vs_internal"]["value"] > 0.9
    assert sep["external_vs_internal"]["lo"] <= sep["external_vs_internal"]["value"]
    assert "all test items" in sep["border_vs_typical"]
    rows_csv = read_csv(out / "predictions.csv")
    novelty = np.array([float(r["novelty"]) for r in rows_csv])
    decile = np.array([int(r["novel_decile"]) for r in rows_csv])
    assert np.all(novelty[decile == 1] >= nov["novel_threshold"])
    assert np.all(novelty[decile == 0] < nov["novel_threshold"])
    run = next(r for r in metrics["runs"] if r["model"] == "pg" and r["split"] == EXT)
    assert set(run["subgroups"]["novel_decile"]) <= {"most novel 10%", "rest"}
    report = (out / "report.md").read_text()
    for text in ("## Protocol novelty", "external sites vs internal test",
                 "most novel decile of the test items", "Manufacturer=<unk> (unseen)"):
        assert text in report, text


def test_protocol_calibration_in_the_evaluation(evaluation):
    from pgjax.eval.calibration import check_record

    out, metrics = evaluation
    rows = read_csv(out / "predictions.csv")
    linear = [r for r in rows if not r["head"].startswith("finetune")]
    assert all(0 < float(r["prob_protocol"]) < 1 and 0 < float(r["prob_temperature"]) < 1
               for r in linear)  # fmt: skip
    runs = [r for r in metrics["runs"] if r["model"] == "pg"]
    for run in runs:
        assert set(run["calibration"]) == {"none", "temperature", "protocol"}
        for entry in run["calibration"].values():
            e = entry["overall"]["ece_uniform"]
            # (a percentile bootstrap interval of ECE need not contain the point estimate)
            assert e["value"] is not None and e["lo"] <= e["hi"]
            assert set(entry["strata"]) == set(run["subgroups"]["stratum"])
    context = json.loads((out / "context.json").read_text())
    fits = context["probe"]["pg/linear/1.0/0"]["calibration"]
    protocol = fits["protocol"]
    assert protocol["temperature"] == fits["temperature"]["temperature"]
    # Groups below the minimum fall back to the global temperature, and say why.
    assert all(g["n"] >= 3 and 0 < g["n_pos"] < g["n"] for g in protocol["groups"].values())
    assert all("reason" in g for g in protocol["fallback"].values())
    assert protocol["groups"] and protocol["fallback"]
    record = check_record(json.loads((out / context["calibration"]["files"]["pg/linear"])
                                     .read_text()), "pg")  # fmt: skip
    assert record["calibration"] == protocol and record["step"] == 2
    report = (out / "report.md").read_text()
    assert "## Calibration" in report and "ECE-15 temperature [CI]" in report


def test_embeddings_are_cached_and_reused(evaluation, store, pg_workdir):
    from pgjax.eval.embed import Model, cached_embeddings

    out, _ = evaluation
    cache = out / "embeddings"
    items = load_items(store, TASK)
    rows = np.concatenate([items.rows[items.where(s)] for s in (("train",), ("val",),
                                                                TASK.test_splits)])  # fmt: skip
    emb, built = cached_embeddings(Model("pg", pg_workdir), store, rows, cache)
    assert built is None  # read from the cache: no model was built
    assert emb["image"].shape[0] == len(rows) and "protocol" in emb


# ---------------------------------------------------------------------------------------------
# Per-site external splits, reference rows, the gate, strata, representation diagnostics


def test_each_external_site_is_its_own_split(store):
    by_site = load_items(store, TASK)
    pooled = load_items(store, TaskSpec("c", "cardiomegaly"))
    ext = pooled.where(("external",))
    assert set(pooled.columns["split"][ext]) == {"external"}
    assert set(by_site.columns["split"][ext]) == {EXT}  # the site's name, same items
    # "external" in test_splits still selects the per-site splits; other splits are unchanged
    np.testing.assert_array_equal(by_site.where(("external",)), ext)
    np.testing.assert_array_equal(by_site.where(("test",)), pooled.where(("test",)))
    from pgjax.eval.tasks import describe

    assert EXT in describe(by_site) and "external" not in describe(by_site)
    # the scores (the true latent) came with the store's table
    assert by_site.scores is not None and not np.isnan(by_site.scores).any()


def test_reference_rows_use_the_same_items_subsets_and_probe(evaluation, store):
    out, metrics = evaluation
    context = json.loads((out / "context.json").read_text())
    status = {r["name"]: r["status"] for r in context["reference_rows"]}
    assert status == {"oracle": "ok", "thumbnail": "ok", "protocol_only": "ok",
                      "random_init": "ok"}  # fmt: skip
    probe = context["probe"]
    for fraction, seed in (("0.5", 0), ("0.5", 1), ("1.0", 0)):
        pg = probe[f"pg/linear/{fraction}/{seed}"]
        for ref in ("oracle", "thumbnail", "protocol_only"):
            r = probe[f"{ref}/linear/{fraction}/{seed}"]
            assert (r["train_items"], r["train_patients"], r["train_positives"]) == (
                pg["train_items"],
                pg["train_patients"],
                pg["train_positives"],
            )
    rows = read_csv(out / "predictions.csv")
    ids = {m: sorted(r["item_id"] for r in rows if r["model"] == m and r["seed"] == "0"
                     and r["label_fraction"] == "1.0" and r["head"] == "linear")
           for m in ("pg", "oracle", "thumbnail")}  # fmt: skip
    assert ids["pg"] == ids["oracle"] == ids["thumbnail"]
    # The oracle's probability is a monotone (1-D logistic) function of the true latent, so it
    # ranks the internal test exactly as the score does: the label is a noisy read of the
    # score, so that is below 1. Its probabilities lie strictly between 0 and 1.
    from pgjax.eval import metrics as M

    items = load_items(store, TASK)
    score_of = dict(zip(items.columns["study_key"], items.scores, strict=True))
    test = [r for r in rows if r["model"] == "oracle" and r["split"] == "test"
            and r["label_fraction"] == "1.0" and r["seed"] == "0"]  # fmt: skip
    expected = M.auroc([int(r["label"]) for r in test], [score_of[r["item_id"]] for r in test])
    oracle = next(r for r in metrics["runs"] if r["model"] == "oracle" and r["split"] == "test"
                  and r["label_fraction"] == 1.0)  # fmt: skip
    assert oracle["overall"]["auroc"]["value"] == pytest.approx(expected, abs=1e-12)
    assert expected > 0.75  # the score carries the finding
    assert oracle["gate"] == "informative"
    probs = [float(r["prob"]) for r in rows if r["model"] == "oracle"]
    assert 0.0 < min(probs) and max(probs) < 1.0
    assert {"oracle", "thumbnail", "protocol_only"} <= set(metrics["gate"]["models"])


def test_a_reference_without_its_input_is_skipped_with_the_reason(store, corpus, pg_workdir,
                                                                  tmp_path):  # fmt: skip
    from pgjax.eval.embed import Model
    from pgjax.eval.evaluate import EvalSettings, evaluate

    labels = tmp_path / "labels.csv"
    with open(corpus / "labels.csv", newline="") as f, labels.open("w") as g:
        for row in csv.reader(f):
            g.write(",".join(row[:3]) + "\n")  # no score column
    task = TaskSpec("cardiomegaly", "cardiomegaly", label_fractions=(1.0,), seeds=(0,))
    settings = EvalSettings(n_boot=20, subgroup_boot=10, references=("oracle", "thumbnail"))
    metrics = evaluate([Model("pg", pg_workdir)], task, store, tmp_path / "out", settings,
                       labels=labels, salt_file=salt_of(store))  # fmt: skip
    refs = {r["name"]: r for r in metrics["reference_rows"]}
    assert refs["oracle"]["status"] == "skipped"
    assert "labels.csv has no score column" in refs["oracle"]["reason"]
    assert refs["thumbnail"]["status"] == "ok" and "random_init" not in refs
    assert {r["model"] for r in metrics["runs"]} == {"pg", "thumbnail"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**oracle**" in report and "skipped: no true latent score" in report
    # the diagnostics say why there is no score r
    assert "no score column" in metrics["representation"]["pg"]["score_r"]["reason"]
    with pytest.raises(ValueError, match="references must be among"):
        EvalSettings(references=("oracle", "crystal_ball"))


def test_gate_and_worst_stratum_in_metrics_match_the_intervals(evaluation):
    out, metrics = evaluation
    tests = {(r["model"], r["head"], r["label_fraction"]): r for r in metrics["runs"]
             if r["split"] == "test" and r["seed"] == 0}  # fmt: skip
    for r in metrics["runs"]:
        a = tests[(r["model"], r["head"], r["label_fraction"])]["overall"]["auroc"]
        informative = a["lo"] is not None and a["lo"] > 0.5
        assert r["gate"] == ("informative" if informative else "not informative")
        strata = {g: s for g, s in r["subgroups"]["stratum"].items()
                  if s["auroc"]["lo"] is not None}  # fmt: skip
        w = r["worst_stratum"]
        if strata:
            assert w["auroc"] == min(s["auroc"]["value"] for s in strata.values())
            assert w["stratum"] in strata and w["strata"] == len(strata)
        else:
            assert w["stratum"] is None
    models = metrics["gate"]["models"]
    assert set(models) == {"pg", "random_init", "oracle", "thumbnail", "protocol_only"}
    for m, g in models.items():
        rows = [x for x in metrics["gate"]["rows"] if x["model"] == m]
        assert (g["status"] == "informative") == any(x["status"] == "informative" for x in rows)


def _run(model, split, auc, lo, hi, gate, diff=None):
    vs = None if diff is None else {"diff": diff, "auc_a": auc, "auc_b": auc - diff,
                                    "p_value": 0.01}  # fmt: skip
    return {"model": model, "head": "linear", "label_fraction": 1.0, "seed": 0, "split": split,
            "overall": {"auroc": {"value": auc, "lo": lo, "hi": hi}}, "gate": gate,
            "vs_reference": vs, "subgroups": {}}  # fmt: skip


def test_gate_rule_and_verdict_name_uninformative_models_instead_of_comparing():
    from pgjax.eval.report import gate_runs, verdict

    runs = [_run("pg", "test", 0.80, 0.62, 0.98, None),
            _run("mae", "test", 0.55, 0.41, 0.69, None),
            _run("simclr", "test", 0.30, 0.15, 0.45, None),
            _run("pg", EXT, 0.70, 0.6, 0.8, None)]  # fmt: skip
    gate = gate_runs(runs)
    assert gate[("pg", "linear", 1.0)]["status"] == "informative"
    assert gate[("mae", "linear", 1.0)]["status"] == "not informative"
    assert "contains 0.5" in gate[("mae", "linear", 1.0)]["reason"]
    assert gate[("simclr", "linear", 1.0)]["reason"] == "internal test interval below 0.5"
    metrics = {"reference": "pg", "runs": [
        _run("pg", EXT, 0.70, 0.6, 0.8, "informative"),
        _run("mae", EXT, 0.60, 0.5, 0.7, "not informative", diff=-0.10),
        _run("simclr", EXT, 0.65, 0.55, 0.75, "informative", diff=-0.05)]}  # fmt: skip
    text = "\n".join(verdict(metrics, EXT))
    assert "so not compared: **mae** (linear 100%)." in text
    assert "pg beats simclr" in text
    assert "pg beats mae" not in text and "mae (AUROC" not in text
    # An uninformative reference is compared with nothing.
    metrics["runs"][0]["gate"] = "not informative"
    text = "\n".join(verdict(metrics, EXT))
    assert "not compared: **pg** (linear 100%); **mae**" in text and "beats" not in text
    from pgjax.eval.report import results_table

    metrics["across_seeds"] = []
    table = "\n".join(results_table(metrics, EXT))
    assert "| simclr | linear | 100% |" in table
    assert "not compared (ref. not informative)" in table and "-0.050" not in table


def test_representation_diagnostics_read_what_the_embedding_carries():
    from pgjax.eval import diagnostics as D

    rng = np.random.default_rng(0)
    n = 240
    groups = np.array([f"p{i // 2}" for i in range(n)])  # two items per patient
    view = np.where(rng.random(n) < 0.4, "AP", "PA")
    score = rng.normal(size=n)
    noise = rng.normal(size=(n, 16))
    carries = noise.copy()
    carries[:, 0] += 3 * score  # the score, in every view
    carries[:, 1] += 3 * (view == "AP")  # and the view
    strata = np.array([f"ViewPosition={v}" for v in view])
    good = D.representation_diagnostics(carries, groups, score, strata, {"ViewPosition": view})
    blind = D.representation_diagnostics(noise, groups, score, strata, {"ViewPosition": view})
    assert good["score_r"]["pooled"]["r"] > 0.9
    assert all(e["r"] > 0.9 for e in good["score_r"]["strata"].values())
    assert abs(blind["score_r"]["pooled"]["r"]) < 0.3
    assert set(good["score_r"]["strata"]) == {"ViewPosition=AP", "ViewPosition=PA"}
    f_good, f_blind = good["fields"]["ViewPosition"], blind["fields"]["ViewPosition"]
    assert f_good["majority"] == f_blind["majority"] == pytest.approx((view == "PA").mean())
    assert f_good["accuracy"] > 0.9
    assert f_blind["accuracy"] < f_blind["majority"] + 0.1
    one = D.field_accuracy(noise, np.array(["X"] * n), groups)
    assert one["accuracy"] is None and one["reason"] == "one value only"
    tiny = D.ridge_r(noise[:5], score[:5], groups[:5])
    assert tiny["r"] is None and "too few" in tiny["reason"]


def test_diagnostics_of_every_encoder_reach_metrics_and_report(evaluation):
    out, metrics = evaluation
    rep = metrics["representation"]
    assert set(rep) == {"pg", "random_init"}  # encoders only: references have no embedding
    for d in rep.values():
        assert d["dim"] == 64 and d["n"] == 90
        assert set(d["score_r"]["strata"]) == {"ViewPosition=AP", "ViewPosition=PA"}
        assert d["score_r"]["pooled"]["r"] is not None
        assert set(d["fields"]) == {"ViewPosition", "Manufacturer"}  # no kernel on radiographs
        assert 0.5 <= d["fields"]["ViewPosition"]["majority"] <= 1.0
    report = (out / "report.md").read_text()
    assert "score r ViewPosition=AP" in report and "ViewPosition acc. (majority)" in report


def _fake_predictions(path, rng):
    """predictions.csv of two models on test and two per-site external splits."""
    from pgjax.eval.evaluate import PREDICTION_COLUMNS, write_predictions

    rows = []
    for model, signal in (("pg", 2.0), ("mae", 0.0)):
        for split in ("test", "external:site_x", "external:site_y"):
            for i in range(60):
                y = int(i % 3 == 0)
                view = "AP" if i % 2 else "PA"
                z = signal * y + rng.normal()
                rows.append({"task": "t", "model": model, "head": "linear",
                             "label_fraction": 1.0, "seed": 0, "split": split,
                             "item_id": f"{split}-{i}", "patient_key": f"{split}-p{i // 2}",
                             "site": split.partition(":")[2] or "site_a", "vendor": "V",
                             "scanner_model": "M", "modality": "CR", "protocol_border": 0,
                             "stratum": f"ViewPosition={view}", "label": y,
                             "prob": float(1 / (1 + np.exp(-z))), "novelty": float(i),
                             "novel_decile": int(i >= 54),
                             "prob_temperature": float(1 / (1 + np.exp(-z / 1.5))),
                             "prob_protocol": float(1 / (1 + np.exp(-z / (1.2 if i % 2
                                                                          else 1.8))))})
    assert tuple(rows[0]) == PREDICTION_COLUMNS
    write_predictions(path, rows)


def test_per_site_external_splits_reach_report_plots_tool_and_sweep_table(tmp_path):
    from pgjax.eval import report
    from pgjax.eval.sweep import table_rows

    _fake_predictions(tmp_path / "predictions.csv", np.random.default_rng(0))
    context = {
        "task": dataclasses.asdict(TaskSpec("t", "t", external_by_site=True)),
        "store": "S", "models": [], "reference": "pg", "reference_rows": [],
        "strata": {"fields": ["ViewPosition"]}, "representation": {},
        "settings": {"sensitivity": 0.9, "n_boot": 20, "subgroup_boot": 10},
        "label_join": {}, "counts": {}, "skipped": [],
        "protocol_border": {"definition": "d", "border_items": 0, "unseen_items": 0,
                            "training_protocols": 1, "min_patients": 3},
    }  # fmt: skip
    metrics = report.write_all(tmp_path, context)
    text = (tmp_path / "report.md").read_text()
    assert (
        text.index("## Results: external:site_x split")
        < text.index("## Results: external:site_y split")
        < text.index("## Results: test split")
    )
    assert "Held-out site site_y" in text
    for split in ("external_site_x", "external_site_y", "test"):
        assert (tmp_path / "plots" / f"roc_reliability_{split}.png").exists()
    # mae has no signal: not informative, so named, not compared
    assert metrics["gate"]["models"]["mae"]["status"] == "not informative"
    assert "not compared: **mae** (linear 100%)." in text
    from pgjax.eval.report import console_summary

    lines = console_summary(metrics)
    assert lines[0].startswith("external:site_x (AUROC") and "internal test (AUROC" in "".join(
        lines
    )
    assert "gate: NOT informative, not compared: mae" in lines
    assert any(x.startswith("gate: informative") and "pg (linear 100%)" in x for x in lines)
    assert {r["split"] for r in table_rows(metrics)} == {"test", "external:site_x",
                                                         "external:site_y"}  # fmt: skip
    done = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0 and "AGREE" in done.stdout, done.stdout + done.stderr
    # The tool checks the worst stratum too: a wrong one is caught.
    m = json.loads((tmp_path / "metrics.json").read_text())
    run = next(r for r in m["runs"] if r["worst_stratum"]["stratum"] is not None)
    run["worst_stratum"]["stratum"] = "ViewPosition=LL"
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    done = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 1 and "worst stratum" in done.stdout


# ---------------------------------------------------------------------------------------------
# Card and commands


def test_card_embeds_results_bias_table_and_audit(evaluation, pg_workdir, tmp_path):
    from pgjax.cli import main

    out, _ = evaluation
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"store": "S", "files_scanned": 3, "arrays_scanned": 8,
                                 "identifiers": 10, "hits_total": 0, "hits": []}))  # fmt: skip
    card = tmp_path / "card.md"
    code = main(["card", "--workdir", str(pg_workdir), "--eval", str(out), "--name", "pg",
                 "--audit", str(audit), "--out", str(card)])  # fmt: skip
    assert code == 0
    text = card.read_text()
    for section in ("## Intended use", "## Training data", "by vendor:", "External validation",
                    "### Calibration", "Bias audit", "## De-identification audit",
                    "**Result: clean**", "## Known limits",
                    "### Recalibration (`pgjax eval --calibrate protocol`)",
                    "ECE-15 protocol [CI]", "### Protocol novelty"):  # fmt: skip
        assert section in text, section


def test_eval_command_rejects_bad_input_clearly(pg_workdir, tmp_path, capsys):
    from pgjax.cli import main

    assert main(["eval", "--workdir", str(tmp_path), "--task", "cardiomegaly"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(pg_workdir), "--task", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(pg_workdir), "--task", "cardiomegaly",
                 "--heads", "linear,magic"]) == 2  # fmt: skip
    assert "heads must be among" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Slow: fine-tuning and a sweep


@pytest.mark.slow
def test_finetune_runs_and_keeps_the_best_validation_step(evaluation, store, pg_workdir):
    from pgjax.eval.embed import Embedder, Model

    items = load_items(store, TASK)
    # Validation on val + test: with this corpus and salt, val alone may hold one class.
    tr, va, te = (items.where(s) for s in (("train",), ("val", "test"), ("external",)))
    assert 0 < items.labels[va].sum() < len(va)
    embedder = Embedder(Model("pg", pg_workdir), store, batch=8)
    emb = embedder.embed(items.rows[np.concatenate([tr, va])])
    x_tr, x_va = emb["image"][: len(tr)], emb["image"][len(tr) :]
    probe = probe_lib.train_linear_probe(x_tr, items.labels[tr], items.columns["patient_key"][tr],
                                         x_va, items.labels[va], (1e-2, 1.0))  # fmt: skip
    result = probe_lib.finetune(
        embedder, items.rows[tr], items.labels[tr], items.rows[va], items.labels[va],
        items.rows[te], probe.raw_head(), steps=4, batch=8, lr=1e-4, head_lr=1e-2,
        weight_decay=0.0, eval_every=2, seed=0,
    )  # fmt: skip
    assert result.probs.shape == (len(te),) and np.all((result.probs > 0) & (result.probs < 1))
    assert result.val_losses
    assert result.best_step == min(result.val_losses, key=result.val_losses.get)
    # Step 0 is the linear probe itself (LP-FT): the same validation loss.
    pv = np.clip(probe.predict(x_va), 1e-7, 1 - 1e-7)
    y_va = items.labels[va]
    probe_loss = -np.mean(y_va * np.log(pv) + (1 - y_va) * np.log(1 - pv))
    assert result.val_losses[0] == pytest.approx(probe_loss, rel=1e-4)


@pytest.mark.slow
def test_sweep_writes_one_table_with_reference_comparisons(store, tmp_path):
    from pgjax.commands.eval import load_tasks_config
    from pgjax.eval.sweep import run_sweep
    from pgjax.train.config_lib import load_config

    ablation = load_config(REPO / "configs" / "ablations" / "demo.py",
                           ["steps=2", "seeds=0,", "label_fractions=1.0,"])  # fmt: skip
    ablation.rows = tuple(r for r in ablation.rows if r["name"] in ("pg", "simclr"))
    ablation.overrides = ("input.global_batch=8", "checkpoint_every=2")
    tasks = load_tasks_config(None, ["metrics.n_boot=20", "metrics.subgroup_boot=10"])
    result = run_sweep(ablation, str(store), tmp_path, tasks)
    table = read_csv(tmp_path / "table.csv")
    assert {r["model"] for r in table} == {"pg", "simclr", "random_init", "oracle", "thumbnail",
                                           "protocol_only"}  # fmt: skip
    assert all(r["p_value_vs_reference"] or r["model"] == "pg" or r["n_pos"] in ("0", "1")
               for r in table)  # fmt: skip
    assert "| pg | linear | 100% |" in (tmp_path / "table.md").read_text()
    assert result["failed"] == []


@pytest.mark.slow
def test_sweep_transfer_row_from_a_checkpoint_and_skipped_without_one(store, tmp_path):
    """The `transfer` row: the reference's encoder (resnet_mu) loaded from a timm-layout file
    written by torch, probed without pretraining and compared with the reference; rerun
    without a checkpoint, the row is skipped and the reason is in every output."""
    import re

    import torch

    from pgjax.commands.eval import load_tasks_config
    from pgjax.eval.sweep import run_sweep
    from pgjax.export import modeling_pgjax as tm
    from pgjax.train.config_lib import load_config

    torch.manual_seed(0)
    resnet = tm.ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=16, input_shape=(32, 32),
                       in_chans=3)  # fmt: skip
    state = {}
    for k, v in resnet.state_dict().items():  # timm's names: bnN, downsample.0/.1
        k = re.sub(r"(^|\.)norm(\d)\.", r"\1bn\2.", k)
        state[k.replace("downsample_conv", "downsample.0").replace("downsample_norm",
                                                                   "downsample.1")] = v
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)
    checkpoint = tmp_path / "resnet_mu.pth"
    torch.save(state, checkpoint)

    ablation = load_config(REPO / "configs" / "ablations" / "demo.py",
                           ["steps=2", "seeds=0,", "label_fractions=1.0,",
                            f"transfer.checkpoint={checkpoint}"])  # fmt: skip
    ablation.rows = tuple(r for r in ablation.rows if r["name"] == "pg")
    ablation.overrides = ("input.global_batch=8", "checkpoint_every=2")
    tasks = load_tasks_config(None, ["metrics.n_boot=20", "metrics.subgroup_boot=10"])
    result = run_sweep(ablation, str(store), tmp_path / "w", tasks)
    assert result["failed"] == [] and result["skipped"] == []
    assert "transfer" in {r["model"] for r in read_csv(tmp_path / "w" / "table.csv")}
    assert "| transfer | linear | 100% |" in (tmp_path / "w" / "table.md").read_text()
    comparison = json.loads((tmp_path / "w" / "comparison.json").read_text())
    row = next(r for r in comparison["rows"] if r["row"] == "transfer")
    assert row["kind"] == "sweep" and row["reference"] == "pg"
    assert row["config"] == "(transfer: resnet_mu.pth into configs/pg.py:cpu, no pretraining)"
    assert any(r["row"] == "transfer" and r["reference"] == "pg" for r in comparison["results"])
    report = (tmp_path / "w" / "eval" / "report.md").read_text()
    assert "**transfer**: published weights in the image encoder (init.from), no pretraining" \
        in report  # fmt: skip

    ablation.transfer.checkpoint = None
    again = run_sweep(ablation, str(store), tmp_path / "w", tasks, eval_only=True)
    reason = "skipped: no checkpoint given (ablation field transfer.checkpoint)"
    assert again["skipped"] == [("transfer", reason)] and again["failed"] == []
    assert f"- transfer: {reason}" in (tmp_path / "w" / "table.md").read_text()
    sweep = json.loads((tmp_path / "w" / "sweep.json").read_text())
    assert sweep["skipped"] == [["transfer", reason]]
    comparison = json.loads((tmp_path / "w" / "comparison.json").read_text())
    assert comparison["skipped"] == [["transfer", reason]]
    predictions = read_csv(tmp_path / "w" / "eval" / "predictions.csv")
    assert "transfer" not in {r["model"] for r in predictions}


# ---------------------------------------------------------------------------------------------
# Sweeps over pretraining seeds (fast: no training; the slow test below trains)


def _fake_seed_predictions(rng, models: dict, n: int = 60):
    """read_predictions-style columns for `models` {name: signal strength or None (noise)} on
    a `test`, a pooled `external` and an `external:site_x` split, one head, 20% labels with
    two label seeds."""
    cols = {k: [] for k in ("model", "head", "label_fraction", "seed", "split", "item_id",
                            "patient_key", "label", "prob")}  # fmt: skip
    y = (np.arange(n) % 3 == 0).astype(int)
    for split in ("test", "external", "external:site_x"):
        for model, strength in models.items():
            for ls in (0, 1):
                s = rng.normal(size=n) + (0.0 if strength is None else strength * y)
                prob = 1 / (1 + np.exp(-s))
                for i in range(n):
                    for k, v in (("model", model), ("head", "linear"), ("label_fraction", 0.2),
                                 ("seed", ls), ("split", split), ("item_id", f"{split}{i:03d}"),
                                 ("patient_key", f"{split}p{i // 2}"), ("label", y[i]),
                                 ("prob", prob[i])):  # fmt: skip
                        cols[k].append(v)
    p = {k: np.array(v) for k, v in cols.items()}
    for k, t in (("label", np.int64), ("seed", np.int64), ("label_fraction", np.float64),
                 ("prob", np.float64)):  # fmt: skip
        p[k] = p[k].astype(t)
    return p


def test_sweep_comparison_aggregates_seeds_and_refuses_unfair_or_uninformative_rows(tmp_path):
    import ml_collections

    from pgjax.eval.sweep import compare_sweep, write_seed_table

    rng = np.random.default_rng(0)
    models = {"pg@0": 2.0, "pg@1": 2.5, "simclr@0": 1.0, "simclr@1": 1.2, "resnet@0": 2.0,
              "resnet@1": 2.0, "noise@0": None, "noise@1": None, "oracle": 4.0}  # fmt: skip
    p = _fake_seed_predictions(rng, models)
    vit = {"key": "vit", "label": "vit_mu/8 (width 64)"}
    res = {"key": "resnet", "label": "resnet_mu (width 16)"}
    info = {"pg": {"reference": "pg", "image_encoder": vit, "config": "a"},
            "simclr": {"reference": "pg", "image_encoder": vit, "config": "b"},
            "noise": {"reference": "pg", "image_encoder": vit, "config": "c"},
            "resnet": {"reference": "pg", "image_encoder": res, "config": "d"}}  # fmt: skip
    failed = [("simclr@2", "RuntimeError: diverged")]
    comparison = compare_sweep(p, info, failed, n_boot=200)
    results = {(r["row"], r["split"]): r for r in comparison["results"]}
    # Every split found in the predictions, every row, one line each.
    assert {s for _, s in results} == {"test", "external", "external:site_x"}
    assert len(comparison["results"]) == 5 * 3
    for split in ("test", "external", "external:site_x"):
        simclr = results[("simclr", split)]
        c = simclr["comparison"]["auroc"]
        assert c["n_seeds_a"] == 2 and c["n_seeds_b"] == 2 and c["paired_seeds"]
        assert c["diff"] == pytest.approx(simclr["auroc_mean"] - results[("pg", split)]
                                          ["auroc_mean"], abs=1e-12)  # fmt: skip
        assert c["lo"] <= c["diff"] <= c["hi"] and 0 < c["p_value"] <= 1
        assert "ece_uniform" in simclr["comparison"]
        assert "different image encoder: resnet_mu (width 16) vs vit_mu/8 (width 64)" in (
            results[("resnet", split)]["not_compared"]
        )  # fmt: skip
        assert results[("resnet", split)]["comparison"] is None
        assert results[("noise", split)]["not_informative"] == ["noise@0", "noise@1"]
        assert "noise is not informative" in results[("noise", split)]["not_compared"]
        oracle = results[("oracle", split)]
        assert oracle["comparison"] is None and oracle["reference"] is None
        assert oracle["n_instances"] == 1 and oracle["auroc_seed_sd"] is None
        assert results[("pg", split)]["reference"] == "pg"
        assert results[("pg", split)]["n_instances"] == 2
    kinds = {r["row"]: r for r in comparison["rows"]}
    assert kinds["oracle"]["kind"] == "reference" and kinds["pg"]["kind"] == "sweep"
    assert kinds["simclr"]["failed"] == [{"model": "simclr@2", "reason": "RuntimeError: diverged"}]

    # The registered primary metric, read the other way round from how it is stored (simclr
    # against its reference pg), with the decision rule applied; one that does not exist says so.
    from pgjax.eval.sweep import primary_result

    want = dict(split="external:site_x", head="linear", label_fraction=0.2, row="pg",
                versus="simclr", metric="auroc")  # fmt: skip
    primary = primary_result(comparison, want)
    stored = results[("simclr", "external:site_x")]["comparison"]["auroc"]
    assert primary["diff"] == pytest.approx(-stored["diff"])
    assert (primary["lo"], primary["hi"]) == pytest.approx((-stored["hi"], -stored["lo"]))
    expected = ("better" if primary["lo"] > 0 else "worse" if primary["hi"] < 0
                else "no difference detected")  # fmt: skip
    assert primary["verdict"] == expected
    missing = primary_result(comparison, {**want, "versus": "resnet"})
    assert missing["verdict"] == "not computed" and "different image encoder" in missing["reason"]
    comparison["primary"] = primary

    comparison.update(task="cardiomegaly", pretrain_seeds=[0, 1, 2])
    write_seed_table(tmp_path, comparison, ml_collections.ConfigDict({"steps": 5}))
    md = (tmp_path / "table.md").read_text()
    assert f"**{expected}**" in md and "pg minus simclr on external:site_x" in md
    for text in ("## test split", "## external:site_x split", "| pg | linear | 20% | 60 (20) | 2 |",
                 "different image encoder", "- simclr@2: RuntimeError: diverged",
                 "not informative: noise@0 noise@1"):  # fmt: skip
        assert text in md, text
    assert md.index("## external split") < md.index("## test split")  # report.ordered_splits
    table = read_csv(tmp_path / "table.csv")
    assert len(table) == 15
    row = next(r for r in table if r["row"] == "simclr" and r["split"] == "external")
    assert float(row["diff_auroc_lo"]) <= float(row["diff_auroc"]) <= float(row["diff_auroc_hi"])
    assert row["reference"] == "pg" and row["n_instances"] == "2"


def test_pretrain_seeds_are_checked_and_failed_instances_are_listed(tmp_path):
    import ml_collections

    from pgjax.eval.sweep import pretrain_rows, pretrain_seeds

    rows = ({"name": "pg", "config": "configs/pg.py:tiny"},
            {"name": "bad", "config": "configs/nope.py"})  # fmt: skip
    a = ml_collections.ConfigDict({"steps": 3, "overrides": (), "pretrain_seeds": (0, 1),
                                   "rows": rows})  # fmt: skip
    assert pretrain_seeds(a) == (0, 1)
    for bad in ((), (0, 0), (-1,), ("x",), (0.5,)):
        with pytest.raises(ValueError, match="pretrain_seeds"):
            pretrain_seeds(ml_collections.ConfigDict({"pretrain_seeds": bad}))
    assert pretrain_seeds(ml_collections.ConfigDict({})) == (0,)
    log = []
    done, failed = pretrain_rows(a, "store", tmp_path, log.append, eval_only=True)
    assert done == []
    names = [n for n, _ in failed]
    assert names == ["pg@0", "pg@1", "bad@0", "bad@1"]
    assert "not trained to 3 steps (--eval-only)" in dict(failed)["pg@1"]
    assert (tmp_path / "bad" / "seed1.error.txt").exists()
    from pgjax.eval.sweep import check_references

    a.reference = "pg"
    check_references(a)
    a.rows = (*rows, {"name": "resnet", "config": "configs/simclr.py:tiny", "reference": "pgg"})
    with pytest.raises(ValueError, match=r"ablation field rows\[2\].reference: 'pgg' is not a"):
        check_references(a)
    a.reference = "nope"
    with pytest.raises(ValueError, match="ablation field reference: 'nope'"):
        check_references(a)
    a.rows, a.reference = rows, "pg"
    a.finetune = {"rows": ("pg", "random_init"), "label_fractions": (0.2,)}
    check_references(a)
    a.finetune = {"rows": ("simclr",), "label_fractions": (0.2,)}
    with pytest.raises(ValueError, match="ablation field finetune.rows: 'simclr' is not a row"):
        check_references(a)


@pytest.mark.slow
def test_sweep_over_pretraining_seeds_resumes_and_reports_a_failed_instance(store, tmp_path):
    """2 rows x 2 pretraining seeds, 2 steps each: WORKDIR/<row>/seed<k>, models <row>@<k>, the
    seed reaching the training config; a rerun retrains nothing; an instance whose checkpoint
    is gone is listed under the table with --eval-only while the others are reported."""
    from pgjax.commands.eval import load_tasks_config
    from pgjax.eval.sweep import run_sweep
    from pgjax.train.config_lib import load_config

    ablation = load_config(REPO / "configs" / "ablations" / "demo.py",
                           ["steps=2", "seeds=0,", "label_fractions=1.0,",
                            "pretrain_seeds=0,1"])  # fmt: skip
    ablation.rows = tuple(r for r in ablation.rows if r["name"] in ("pg", "simclr"))
    ablation.overrides = ("input.global_batch=8", "checkpoint_every=2")
    ablation.finetune = dict(rows=("pg", "random_init"), label_fractions=(1.0,))
    tasks = load_tasks_config(None, ["metrics.n_boot=20", "metrics.subgroup_boot=10",
                                     "finetune.steps=2", "finetune.eval_every=1"])  # fmt: skip
    result = run_sweep(ablation, str(store), tmp_path, tasks)
    assert result["failed"] == []
    # The fine-tuning pass: its own predictions, only the rows it names, a finetune head.
    tuned = read_csv(tmp_path / "eval_finetune" / "predictions.csv")
    assert {r["model"] for r in tuned} == {"pg@0", "pg@1", "random_init@0", "random_init@1"}
    assert {r["head"] for r in tuned} == {"finetune"}
    tuned_rows = json.loads((tmp_path / "comparison_finetune.json").read_text())["results"]
    assert {r["row"] for r in tuned_rows} == {"pg", "random_init"}
    assert "| random_init | finetune | 100% |" in (tmp_path / "table_finetune.md").read_text()
    for row in ("pg", "simclr"):
        for k in (0, 1):
            config = json.loads((tmp_path / row / f"seed{k}" / "config.json").read_text())
            assert config["seed"] == k
    preds = read_csv(tmp_path / "eval" / "predictions.csv")
    assert {r["model"] for r in preds} >= {"pg@0", "pg@1", "simclr@0", "simclr@1",
                                           "random_init@0", "random_init@1"}  # fmt: skip
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["pretrain_seeds"] == [0, 1]
    lines = [r for r in comparison["results"] if r["row"] in ("pg", "simclr", "random_init")]
    splits = {r["split"] for r in preds}
    assert {(r["row"], r["split"]) for r in lines} == {
        (row, s) for row in ("pg", "simclr", "random_init") for s in splits
    }  # fmt: skip
    for r in lines:
        assert r["n_instances"] == 2
        if r["row"] != "pg":
            # A difference with its interval, or the reason there is none.
            assert (r["comparison"] is None) == bool(r["not_compared"]), r
    table = read_csv(tmp_path / "table.csv")
    assert {r["row"] for r in table} >= {"pg", "simclr", "random_init"}
    assert "| simclr | linear | 100% |" in (tmp_path / "table.md").read_text()

    log = []
    shutil.rmtree(tmp_path / "simclr" / "seed1" / "checkpoints")
    again = run_sweep(ablation, str(store), tmp_path, tasks, eval_only=True, log=log.append)
    assert sum("already trained" in m for m in log) == 3 and not any("pretraining" in m
                                                                     for m in log)  # fmt: skip
    assert [n for n, _ in again["failed"]] == ["simclr@1"]
    md = (tmp_path / "table.md").read_text()
    assert "- simclr@1: not trained to 2 steps (--eval-only)" in md
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    simclr = [r for r in comparison["results"] if r["row"] == "simclr"]
    assert simclr and all(r["models"] == ["simclr@0"] for r in simclr)


def test_single_seed_table_gives_no_difference_across_image_encoders(tmp_path):
    import ml_collections

    from pgjax.eval.sweep import table_rows, write_table

    def run(model, split, diff):
        auc = {"value": 0.7, "lo": 0.6, "hi": 0.8}
        vs = None if diff is None else {"diff": diff, "p_value": 0.03}
        return {"model": model, "head": "linear", "label_fraction": 1.0, "seed": 0,
                "split": split, "overall": {"n": 40, "n_pos": 10, "auroc": auc},
                "vs_reference": vs}  # fmt: skip

    models = (("pg", None), ("simclr", -0.05), ("ce_dcm", 0.1))
    metrics = {"task": "cardiomegaly", "reference": "pg", "across_seeds": [],
               "runs": [run(m, s, d) for s in ("test", "external:site_x", "external")
                        for m, d in models]}  # fmt: skip
    other = {"ce_dcm": "resnet_mu (width 16) vs vit_mu/8 (width 64)"}
    rows = table_rows(metrics, other)
    assert [r["split"] for r in rows][::3] == ["external", "external:site_x", "test"]
    by = {(r["model"], r["split"]): r for r in rows}
    assert by[("simclr", "external:site_x")]["diff_vs_reference"] == -0.05
    assert by[("ce_dcm", "external:site_x")]["diff_vs_reference"] is None
    write_table(tmp_path, rows, metrics, [], ml_collections.ConfigDict({"steps": 2}), other)
    md = (tmp_path / "table.md").read_text()
    assert "## external:site_x split" in md
    assert "| ce_dcm | linear | 100% | 40 (10) | 0.700 [0.600, 0.800] | n/a | n/a | " \
        "not compared* |  |" in md  # fmt: skip
    assert "ce_dcm: resnet_mu (width 16) vs vit_mu/8 (width 64)" in md
    assert "| simclr | linear | 100% | 40 (10) | 0.700 [0.600, 0.800] | n/a | n/a | -0.050 | " \
        "0.030 |" in md  # fmt: skip


def test_sweep_command_rejects_bad_pretrain_seeds_clearly(tmp_path, capsys):
    from pgjax.cli import main

    demo = str(REPO / "configs" / "ablations" / "demo.py")
    code = main(["sweep", demo, "--store", str(tmp_path / "store"), "--workdir",
                 str(tmp_path / "w"), "--set", "pretrain_seeds=1,1"])  # fmt: skip
    assert code == 2
    assert "ablation field pretrain_seeds: expected distinct non-negative integers" in (
        capsys.readouterr().err
    )


def test_sweep_reuses_a_finished_evaluation_only_when_nothing_it_read_changed(tmp_path):
    """A sweep resumed after a stop in its fine-tuning pass keeps the linear evaluation it
    finished; a change of models, settings, task, checkpoints or store evaluates again."""
    import dataclasses
    import os

    from pgjax.eval.embed import Model
    from pgjax.eval.evaluate import EvalSettings
    from pgjax.eval.sweep import finished_evaluation
    from pgjax.eval.tasks import TaskSpec

    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    wd = tmp_path / "pg" / "seed0"
    (wd / "checkpoints" / "300").mkdir(parents=True)
    models = [Model("pg@0", wd), Model("random_init@0", wd, random_init=True)]
    task = TaskSpec(name="t", label="y")
    settings = EvalSettings()
    out = tmp_path / "eval"
    out.mkdir()
    context = {
        "models": [{"name": m.name, "workdir": str(m.workdir), "random_init": m.random_init}
                   for m in models],
        "store": str(store), "task": dataclasses.asdict(task),
        "settings": dataclasses.asdict(settings),
    }  # fmt: skip
    (out / "context.json").write_text(json.dumps(context, default=str))
    (out / "metrics.json").write_text(json.dumps({"runs": [1]}))
    old = (out / "metrics.json").stat().st_mtime - 100
    for p in (wd / "checkpoints" / "300", store / "manifest.json"):
        os.utime(p, (old, old))

    def again(**kw):
        args = dict(models=models, task=task, store=store, settings=settings) | kw
        return finished_evaluation(out, args["models"], args["task"], args["store"],
                                   args["settings"], log=lambda *_: None)  # fmt: skip

    assert again() == {"runs": [1]}
    assert again(models=models[:1]) is None
    assert again(settings=dataclasses.replace(settings, n_boot=settings.n_boot + 1)) is None
    assert again(task=dataclasses.replace(task, name="other")) is None
    assert again(store=tmp_path / "elsewhere") is None
    os.utime(store / "manifest.json")  # the store was rebuilt after the evaluation
    assert again() is None
    os.utime(store / "manifest.json", (old, old))
    os.utime(wd / "checkpoints" / "300")  # a newer checkpoint
    assert again() is None
    (wd / "checkpoints" / "300").rmdir()
    (out / "metrics.json").unlink()  # stopped before its metrics were written
    assert again() is None
