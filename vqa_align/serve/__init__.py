"""Answering questions about images: the Predictor, image decoding of uploads, the gallery, and the
views and figures the app shows."""
