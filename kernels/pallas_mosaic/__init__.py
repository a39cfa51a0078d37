"""Hand-written Pallas kernels for Hopper GPUs through Mosaic GPU, Pallas' GPU backend from jax 0.11
on (its Triton lowering, used by kernels.pallas, is deprecated there). Off a GPU they run in Mosaic
GPU's interpret mode, which simulates the GPU's memory spaces, warpgroups and barriers on CPU and
checks for data races."""
