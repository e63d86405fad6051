"""Sentence classification with alignment attention: the paper's claims on real sentences.

- ``vqa_align.sentiment.data`` (``vqa_align/sentiment/data.py``): the four-domain human-rated sentences
  of the vaderSentiment 3.3.2 sdist -> ``<cache>/sentiment`` with the published movie split.
- :mod:`vqa_align.sentiment.model`: a BERT-family encoder (pretrained MiniLM) converted with
  :func:`vqa_align.align.conversion.convert_to_alignment`, mean-pooled, a linear classifier.
- :mod:`vqa_align.sentiment.runner`: one run (fine-tune, early-stop on dev, evaluate): the VQA
  :class:`~vqa_align.train.trainer.Trainer` with a sentence task (``SentenceTask``), so configs,
  checkpoints, resume, JSONL logs and calibration code are the VQA ones.
- :mod:`vqa_align.sentiment.experiment`: methods x seeds -> report (markdown, JSON, figures).
"""
