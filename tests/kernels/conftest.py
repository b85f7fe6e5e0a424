"""Triton kernels run on the CPU through the interpreter in CI: the variable must be set before any
kernel module is imported (triton.jit reads it when a kernel is defined)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
