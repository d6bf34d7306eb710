"""Intra-site parallelism: process groups, DDP/FSDP2, local launching."""
