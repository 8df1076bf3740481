"""Fused Triton kernels for dampopt's friction optimizers (installed as ``dampopt.kernels``)."""
