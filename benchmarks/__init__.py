"""Benchmarks: kernels and the layer against peers. Never imported by moe/ or kernels/."""

from pure_reasoner.toplevel import defer_to_installed

# Imported as a bare top-level name from the repository root: the installed package of that name wins.
defer_to_installed(__name__, __file__)
