"""Python launchers for the CUDA extension dit_fast._C (csrc/), one module per op family.

Each mirrors the signature of its Triton twin in dit_fast/triton_kernels/, so the ops layer can swap
them. They pass raw pointers, sizes and torch's current stream to the torch-free C++ launchers.
"""
