"""Evaluation: MMBench (TSV, circular copies, prompts, answer extraction, CircularEval) and VQA accuracy."""
