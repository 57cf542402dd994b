"""Benchmarks: shoal alone (fanout.py) and side by side with ssh-based tools (run.py)."""
