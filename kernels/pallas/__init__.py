"""Hand-written Pallas kernels, one module per op (kernel body, block sizes, launcher)."""
