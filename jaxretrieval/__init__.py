"""jaxretrieval: image-text retrieval and person re-identification in JAX."""

__version__ = "0.1.0"


def load(path):
    """`model, preprocess, tokenizer = jaxretrieval.load(PATH)`; see `jaxretrieval.api.load`."""
    from jaxretrieval.api import load as _load

    return _load(path)


__all__ = ["load"]
