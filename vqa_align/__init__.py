"""vqa-align: MCAN co-attention VQA with alignment attention (Zhang et al., NeurIPS 2021)."""

__version__ = "0.1.0"
