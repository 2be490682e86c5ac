"""The package version, in a module of its own: ``convexmix.__version__``, setup and
``convexmix info`` read it without importing the package."""

__version__ = "0.1.0"
