"""Export to PyTorch: `pgjax export --workdir DIR --out OUT`.

    convert.py         Flax <-> torch parameter rules, one small function per module kind
    architecture.py    the exported models' description (config.json) and their Flax rebuild
    source.py          a training workdir (checkpoint + store vocabulary) as an export
    exporter.py        writes OUT/ (model.safetensors, config.json, modeling_pgjax.py, timm file)
    parity.py          runs JAX and PyTorch on the same inputs, writes OUT/parity.json
    torch_side.py      the PyTorch side of parity, in a process where JAX cannot be imported
    modeling_pgjax.py  the self-contained PyTorch modules copied into OUT/ (torch + numpy only)

This package's __init__ imports nothing: `python -m pgjax.export.torch_side` must stay JAX-free.
"""
