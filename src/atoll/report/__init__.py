"""Reporting: metrics (JSONL + TensorBoard) and progress display."""
