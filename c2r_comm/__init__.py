"""c2r-comm: expert-parallel MoE communication that sends a token once per GPU (or node)."""

__version__ = "0.1.0"
