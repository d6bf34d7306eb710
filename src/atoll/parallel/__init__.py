"""Intra-site parallelism: process groups, the site's layout (tp x pp x dp), DDP/FSDP2, tensor
parallelism, activation recompute, local launching."""
