"""Datasets: VQA v2 questions and answers (vqa_v2.py), batches and loaders, device-resident data,
and the embedded easy-VQA data set."""
