"""Weights on disk: a run's Orbax checkpoints, read and written (checkpoints.py), the export
format's tensor naming both ways (export_format.py), writing an export (export.py), and a model
with its weights loaded from a run or an export (load.py)."""
