"""PyTorch inference on DICOM files with an exported model; JAX is not needed (nor imported).

    python -m pgjax.torch_infer FILES_OR_FOLDERS... --model OUT --out embeddings.npz

Reads the files with the training store's preprocessing and de-identification (the same code
as `pgjax preprocess`, settings and vocabulary from OUT/config.json), runs OUT/modeling_pgjax.py,
and writes one row per item (2D: per selected frame of each file; 3D models: per series):

    image_embedding        float32 [N, D]   pooled image features
    image_projection       float32 [N, E]   contrastive embedding (models with a projection)
    protocol_embedding     float32 [N, W]   pooled header-token features (models with one)
    protocol_projection    float32 [N, E]
    protocol_novelty       float64 [N]      Mahalanobis distance of the protocol embedding from
                                            the training split's (NaN: no protocol encoder)
    unusual_values         str [N]          "Field=value (unseen|rare); ..." per row: protocol
                                            token strings unseen or rare in training ("" if none)
    probability            float64 [N]      the export's probe, calibrated (exports made with
    probability_uncalibrated float64 [N]    `pgjax export --calibration`)
    path, frame                             the source of each row (-1: a whole series)
    skipped_path, skipped_reason            every file that gave no row, and why

The output names the input files, so it belongs with them (like the store's private folder).
A file that cannot be read is listed and counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pgjax.torch_infer", description=__doc__.split("\n")[0]
    )
    p.add_argument("inputs", nargs="+", help="DICOM files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="an export folder written by `pgjax export`")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--batch", type=int, default=32, help="items per forward pass")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; "
        "1 is faster when other jobs hold the cores)",
    )
    p.add_argument("--chunk-files", type=int, default=256, help="2D models: files read at once")
    return p.parse_args(argv)


def embed(model, items, batch: int) -> dict[str, np.ndarray]:
    """The model's outputs on encoded items, in batches."""
    outs: dict[str, list] = {}

    def add(name, value):
        outs.setdefault(name, []).append(value)

    for i in range(0, len(items.pixels), batch):
        images = items.pixels[i : i + batch]
        add("image_embedding", model.embed_images(images))
        if model.image_proj is not None:
            add("image_projection", model.project_images(images))
        if model.protocol_encoder is not None:
            args = (items.tokens[i : i + batch], items.values[i : i + batch],
                    items.value_mask[i : i + batch])  # fmt: skip
            add("protocol_embedding", model.embed_protocol(*args))
            if model.protocol_proj is not None:
                add("protocol_projection", model.project_protocol(*args))
        tokens = items.tokens[i : i + batch]
        if model.protocol_stats is not None:
            protocol = outs["protocol_embedding"][-1] if model.protocol_encoder is not None \
                else None  # fmt: skip
            novelty = (model.novelty_from_embedding(protocol) if protocol is not None
                       else np.full(len(tokens), np.nan))  # fmt: skip
            add("protocol_novelty", novelty)
            add("unusual_values", np.array(["; ".join(u) for u in model.unusual_values(tokens)],
                                           dtype=str))  # fmt: skip
        if model.calibration is not None:
            image = outs["image_embedding"][-1]
            protocol = outs.get("protocol_embedding", [None])[-1]
            add("probability", model.calibrated_proba(image, protocol, tokens))
            add("probability_uncalibrated",
                model.calibrated_proba(image, protocol, tokens, calibrated=False))
    return {k: np.concatenate(v) for k, v in outs.items()}


def run(inputs, model_dir, out, batch: int = 32, chunk_files: int = 256) -> dict:
    """Embed every item of the inputs into `out`. 2D models read `chunk_files` files at a time
    (memory stays bounded); 3D models read all files first, to group them into series."""
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.dicom_items import encode_files, expand_inputs
    from pgjax.data.tokenizer import Vocabulary
    from pgjax.export.torch_side import load_modeling

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model = load_modeling(model_dir).from_pretrained(model_dir)
    cfg = PreprocessConfig.from_json(config["preprocess"])
    vocab = Vocabulary.from_json(config["vocab"], source=f"{model_dir}/config.json")
    group = config["input"]["group"]
    paths = expand_inputs(inputs)
    step = max(1, chunk_files) if group == "images" else max(1, len(paths))
    parts, sources, skipped = [], [], []
    for start in range(0, len(paths), step):
        items = encode_files(paths[start : start + step], cfg, vocab, group)
        if len(items.pixels):
            parts.append(embed(model, items, batch))
        sources += items.sources
        skipped += items.skipped
        print(f"torch_infer: {min(start + step, len(paths))}/{len(paths)} files, "
              f"{len(sources)} items, {len(skipped)} skipped", file=sys.stderr)  # fmt: skip
    results = {k: np.concatenate([p[k] for p in parts]) for k in (parts[0] if parts else {})}
    results["path"] = np.array([p for p, _ in sources], dtype=str)
    results["frame"] = np.array([f for _, f in sources], dtype=np.int64)
    results["skipped_path"] = np.array([p for p, _ in skipped], dtype=str)
    results["skipped_reason"] = np.array([r for _, r in skipped], dtype=str)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **results)
    tmp.replace(out)
    return {"rows": len(sources), "skipped": skipped}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not (Path(args.model) / "modeling_pgjax.py").exists():
        print(f"torch_infer: {args.model}: not a pgjax export (no modeling_pgjax.py)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        summary = run(args.inputs, args.model, args.out, args.batch, args.chunk_files)
    except (FileNotFoundError, ValueError) as e:
        print(f"torch_infer: {e}", file=sys.stderr)
        return 2
    for path, reason in summary["skipped"]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(
        f"{summary['rows']} items embedded, {len(summary['skipped'])} files skipped -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
