"""The stages of the MoM layer, one folder each: ``scan`` (the memory recurrence), ``slots`` (the scan's inputs),
``mix`` (weighted sum and gated norm of the outputs) and ``decode`` (one token). Each holds its plain-torch
reference, its Triton kernels and autograd functions, and exports its public functions from its ``__init__``."""
