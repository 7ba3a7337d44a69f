"""The data plane: DICOM files to a de-identified, tokenized TensorStore store."""
