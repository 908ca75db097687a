"""Diffusion models: loading (hub, directory, single file, shipped architectures, the tiny model), checks of loaded weights, UNet sampling with truncated backprop, and flow-matching transformers."""
