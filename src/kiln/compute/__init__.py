"""Compute: what a task needs (resources), where it runs (backends), and when (scheduler)."""
