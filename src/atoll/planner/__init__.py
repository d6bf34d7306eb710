"""Planner: cost model, search and simulator (pure Python, no process group)."""
