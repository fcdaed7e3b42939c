"""allmrec: A-LLMRec (Kim et al., KDD 2024), the model library (plain PyTorch, no Ray).

`from allmrec import ALLMRec; ALLMRec.from_pretrained(folder).recommend(user_id=7, k=10)` loads a model
exported by `allmrec export RUN_DIR OUT` (allmrec/export.py); imported on first use, so `import allmrec`
stays light.
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("allmrec")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name == "ALLMRec":
        from allmrec.export import ALLMRec
        return ALLMRec
    raise AttributeError(f"module 'allmrec' has no attribute {name!r}")


__all__ = ["ALLMRec", "__version__"]
