"""Benchmarks: kernels and the layer against peers. Never imported by moe/ or kernels/."""
