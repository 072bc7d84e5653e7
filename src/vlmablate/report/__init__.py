"""Reporting: W&B logging of runs (comparison tables and plots over sweeps come later)."""
