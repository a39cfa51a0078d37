"""Hand-written Triton kernels, one module per op (private _kernels, configs, launcher)."""
