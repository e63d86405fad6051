"""The VQA model: MCAN (mcan.py), the pretrained MiniLM question encoder, dropout without a stored
mask, and the non-finite output check."""
