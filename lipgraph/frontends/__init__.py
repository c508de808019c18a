"""Frontends translate a model into the IR (:mod:`lipgraph.ir`)."""
