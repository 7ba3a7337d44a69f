"""pgjax: Protocol Genome pretraining in JAX.

Data flows one way: DICOM -> store (pgjax.data) -> loader -> model -> checkpoint -> eval/export.
"""

__version__ = "0.1.0"
