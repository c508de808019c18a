"""Bound algorithms over the IR: per-node constants, AutoLip, SeqLip, lower bounds."""
