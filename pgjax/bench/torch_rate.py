"""The PyTorch half of `pgjax bench export`, in its own process with JAX blocked (as users run
it; XLA's CPU threads in the same process would also compete with torch's).

    python -m pgjax.bench.torch_rate OUT INPUTS.npz RESULT.json SECONDS THREADS

THREADS 0 keeps torch's default thread count.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from pgjax.export.torch_side import block_jax

    block_jax()
    import numpy as np
    import torch

    from pgjax.bench.export import rate
    from pgjax.export.torch_side import load_modeling

    out, inputs_path, result_path, seconds, threads = sys.argv[1:] if argv is None else argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    model = load_modeling(out).from_pretrained(out)
    with np.load(inputs_path) as f:
        x = {k: f[k] for k in f.files}
    n = len(x["images"])
    image_rate = rate(lambda: model.embed_images(x["images"]), n, float(seconds))
    result = {"threads": torch.get_num_threads(), "image": image_rate}
    if model.protocol_encoder is not None:
        args = (x["tokens"], x["values"], x["value_mask"])
        result["protocol"] = rate(lambda: model.embed_protocol(*args), n, float(seconds))
    result["image_embedding"] = model.embed_images(x["images"]).tolist()
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
