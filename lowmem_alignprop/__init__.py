"""Memory-optimized AlignProp for Stable Diffusion."""

from lowmem_alignprop.settings import kernel_hub

__version__ = "0.1.0"

kernel_hub.install()  # loading a model touches no network (bitsandbytes' import asked the hub for a CPU kernel)
