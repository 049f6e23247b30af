"""Benchmarks: each module measures a figure side by side with a baseline and prints it (``make bench``)."""
