"""atoll: train one language model across a computing power network."""

__version__ = "0.1.0"
