"""Triton device code of fastvae (installed as fastvae.kernels). Host code lives in fastvae.ops."""
