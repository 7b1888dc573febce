"""Experiment configs (ml_collections). Each file's docstring gives its command."""
