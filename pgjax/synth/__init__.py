"""A synthetic multi-site DICOM corpus: `pgjax synth` (pgjax/commands/synth.py).

phantoms.py draws anatomy and findings, physics.py turns them into pixels under an acquisition
protocol, sites.py holds the scanners and protocol distributions, sitefile.py reads the hospitals
from a site file (default_sites.toml unless one is given), and corpus.py samples studies and
writes DICOM files, labels.csv and corpus.json. Nothing here imports JAX: studies are
synthesized in spawned worker processes that must start fast.
"""

from pgjax.synth.corpus import SynthSettings, write_corpus

__all__ = ["SynthSettings", "write_corpus"]
