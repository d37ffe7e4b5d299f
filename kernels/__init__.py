"""Triton kernels of distil, installed as ``distil.kernels``.

One file per op (the kernels, a launcher writing into caller-allocated outputs, its TUNING table
and ``tuning_for``) plus rows.py, the helpers they share. Registration for CUDA tensors, fake
impls and autograd live in :mod:`distil._ops`.
"""
