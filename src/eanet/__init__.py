"""EANet (External Attention Transformer) and its ViT baseline, faithful to the Keras example."""

__version__ = "0.1.0"

# `import eanet` stays cheap (no torch): these are imported on first use.
_LAZY = {
    "load": "eanet.api",
    "Classifier": "eanet.api",
    "Prediction": "eanet.predict",
    "create_model": "eanet.models",
    "swap_attention": "eanet.nn",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    """Import the public API lazily: eanet.load, eanet.Classifier, eanet.create_model, ..."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eanet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
