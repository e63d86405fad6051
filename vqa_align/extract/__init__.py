"""Image features: the HDF5 region-feature store, the extraction pipeline (pictures -> store), its
backbones, the weight-free region extractor, and image decoding."""
