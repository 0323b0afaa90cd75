"""fedray: federated learning on Ray and PyTorch.

The Python API (:mod:`fedray.api`) is imported on first use, so ``import fedray`` stays cheap:
``fedray.load_config``, ``fedray.run``, ``fedray.compare``, ``fedray.Result``.
"""
__all__ = ["load_config", "run", "compare", "Result", "__version__"]


def __getattr__(name):
    if name in ("load_config", "run", "compare", "Result"):
        from fedray import api

        return getattr(api, name)
    if name == "__version__":
        from fedray.discover import version

        return version()
    raise AttributeError(f"module 'fedray' has no attribute {name!r}")
