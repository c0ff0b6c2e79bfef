"""AQLM quantized matmul kernels (issue 20): Triton kernels for ``seqlab.quant.AQLMLinear`` on a GPU (or CPU tensors
under ``TRITON_INTERPRET=1``, how the suite checks them). ``triton_ops`` has the host side and the docstring."""
