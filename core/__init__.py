"""isthmus: one model, any accelerator, with proof that the numbers match."""

__version__ = "0.1.0"
