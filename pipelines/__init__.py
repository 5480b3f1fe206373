"""The generation engine: a plain Python library (no UI, no server). Start with :mod:`pipelines.engine`."""

__version__ = "0.1.0"
