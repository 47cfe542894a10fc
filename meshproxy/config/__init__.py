"""Configuration: the immutable snapshot model (model.py) and its loader (load.py)."""
