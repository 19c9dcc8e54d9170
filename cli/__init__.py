"""The `fedhydra` console script (it alone may import every other package)."""
