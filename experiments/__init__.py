"""Experiment configs (one file per experiment family) and the paper study (`experiments.study`)."""
