"""Hand-written Pallas kernels for the TPU (Mosaic), one module per op. Off a TPU they run in TPU
interpret mode, which simulates the TPU's memory spaces on CPU and checks for data races."""
