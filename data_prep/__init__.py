"""Converters of public region-feature formats (bottom-up TSV, per-image npz, fixed-box HDF5) into the feature store, installed as ``vqa_align_prep`` (``vqa-align prep tsv|npz|h5``)."""
