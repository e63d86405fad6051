"""Experiments: methods x seeds (grid.py), their results (vqa.py), the report written from results
alone (vqa_report.py), statistics, and the quickstart."""
