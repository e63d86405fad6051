"""The YAML presets (``*.yaml`` here), shipped as package data; see :func:`vqa_align.config.preset_path`."""
