"""Evaluating a checkpoint (evaluator.py) and the one inference loop that validation shares
(loop.py)."""
