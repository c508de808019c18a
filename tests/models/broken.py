"""A model file that fails on import."""

raise RuntimeError("this file is broken on purpose")
