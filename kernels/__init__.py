"""Triton kernels, installed as ``avgn_fast.kernels``: one op per file (launcher, reference, registration)."""
