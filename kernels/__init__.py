"""Triton kernels of distil, installed as ``distil.kernels``.

One file per op: the kernel, its launcher and its tuning table.  Autograd, fake
impls and device dispatch live in :mod:`distil._registry`.
"""
