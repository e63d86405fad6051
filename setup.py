"""Package discovery only (everything else is in pyproject.toml).

Every subpackage of ``vqa_align`` ships, found automatically; the folders ``data_prep``, ``app`` and
``configs`` (mapped in pyproject.toml's ``package-dir``) ship as ``vqa_align_prep``,
``vqa_align_app`` and ``vqa_align_configs``, the last one holding the YAML presets as package data.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["vqa_align", "vqa_align.*"]) + ["vqa_align_prep", "vqa_align_app", "vqa_align_configs"])
