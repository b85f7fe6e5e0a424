"""Triton kernels run on the CPU through the interpreter in CI and natively on a GPU machine. The root
conftest sets ``TRITON_INTERPRET=1`` when there is no CUDA device (before any kernel module is imported:
triton.jit reads it when a kernel is defined); with a GPU the same tests run the compiled kernels."""
