"""Load an export's timm-layout ViT into timm where timm cannot import normally.

    python tools/check_timm_layout.py OUT [TIMM_SITE]

timm 1.0.x imports torchvision (FrozenBatchNorm2d, datasets) and huggingface_hub at package
import; neither is installed beside torch 2.13 on the dev machines. This script stubs those two
packages (the ViT uses neither), builds `timm.create_model(**config["timm"]["create_model"])`,
loads OUT/timm_vit.safetensors strictly and compares its output with modeling_pgjax's. It is the
manual check behind the README's timm claim; tests/test_export.py runs the real check (no stubs)
wherever timm imports. TIMM_SITE: a folder holding timm (`pip install --no-deps --target DIR`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from unittest import mock

import numpy as np


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "huggingface_hub"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = mock.MagicMock()
        m.__path__, m.__spec__, m.__name__, m.__all__ = [], spec, spec.name, []
        return m

    def exec_module(self, module):
        pass


def main(out: str, timm_site: str | None = None) -> int:
    sys.meta_path.insert(0, _Stub())
    if timm_site:
        sys.path.insert(0, timm_site)
    import timm
    import torch
    from safetensors.torch import load_file

    spec = json.load(open(f"{out}/config.json"))["timm"]
    model = timm.create_model(**spec["create_model"]).eval()
    print("timm", timm.__version__, model.load_state_dict(load_file(f"{out}/{spec['weights']}")))
    sys.path.insert(0, out)
    import modeling_pgjax

    ours = modeling_pgjax.from_pretrained(out)
    shape = ours.input_shape
    x = np.random.default_rng(0).uniform(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)[:, None]).numpy()
    print("max |timm - modeling_pgjax| =", float(np.abs(got - ours.embed_images(x)).max()))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
