"""The IWAE paper's MNIST table and 8-bit MNIST in bits/dim (python -m fastvae.mnist)."""
