"""Training: one generic loop (trainer.py) for every task behind the TrainingTask interface
(task.py), the VQA task (vqa_task.py), and its pieces: step, checkpointing, progress, stopping,
schedule, distributed."""
