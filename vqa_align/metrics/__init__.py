"""Pure measures: the official VQA accuracy and calibration (ECE, PAvPU)."""
