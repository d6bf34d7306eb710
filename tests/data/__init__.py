"""Tiny data for the data pipeline's tests: generated on the fly, nothing large is shipped."""
