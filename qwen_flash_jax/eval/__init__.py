"""Evaluation: judges and benchmark tables."""
