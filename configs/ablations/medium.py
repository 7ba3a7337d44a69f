"""Medium-size ablation: the demo's list with more pretraining, on a larger corpus.

    pgjax synth --out medium/corpus --studies 600 --mix 0.8,0.1,0.1,0 --workers 2
    pgjax preprocess medium/corpus/dicom --out medium/store --labels medium/corpus/labels.csv \
        --site-names medium/corpus/site_names.csv --external-sites site_d --workers 2 \
        --set image_size=128,128 --set min_patients=3 --set volume_shape=32,64,64
    pgjax sweep configs/ablations/medium.py --store medium/store --workdir medium/sweep

The demo's rows with the tiny models they had when this ablation was run and committed
(configs/NAME.py:tiny, ViT-mu/8 but CE+DCM), 300 steps each, label fractions 10%, 20% and 100%
with three seeds. The committed results (benchmarks/ablations/medium/) predate the current
synthetic corpus, whose default sites no longer reverse the view shortcut.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ablation_demo", Path(__file__).with_name("demo.py"))
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(arg: str = ""):
    c = _demo.get_config()
    c.label_fractions = (0.1, 0.2, 1.0)
    c.seeds = (0, 1, 2)
    c.steps = 300
    # The augmentation it was run with (then every config's default; now configs/
    # pg_resized_crop.py's).
    c.overrides = ("augment.preset=light",)
    c.rows = tuple(dict(r, config=r["config"].replace(":cpu", ":tiny")) for r in c.rows)
    return c
