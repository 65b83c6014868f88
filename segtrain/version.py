"""segtrain's version, in a module of its own so that modules below the package's face can name it."""

__version__ = "0.1.0"
