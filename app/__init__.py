"""The Gradio app (``vqa-align demo``), installed as ``vqa_align_app``: layout, handlers, wiring."""
