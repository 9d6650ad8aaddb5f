"""EANet (External Attention Transformer) and its ViT baseline, faithful to the Keras example."""

__version__ = "0.1.0"
