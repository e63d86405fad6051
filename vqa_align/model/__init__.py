"""The VQA model: MCAN (mcan.py), the pretrained MiniLM question encoder, and the non-finite
output check."""
