"""Surgical Feature-Space Decomposition (SFSD) of transformer Linear layers, and its peers."""

__version__ = "0.1.0"
