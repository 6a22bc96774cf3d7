"""flambeau: a pure-Python, plugin-based model server for PyTorch, TorchServe-compatible."""

__version__ = "0.1.0"
