"""What a run leaves on disk: checkpoints (written atomically, loaded strictly) and run folders
(what vqa-align may replace)."""
