"""Test helper: the LDM single-file layout writer, which the package ships (models/ldm_layout.py)."""

from lowmem_alignprop.models.ldm_layout import (  # noqa: F401 (re-exported for the tests)
    clip_to_ldm,
    open_clip_to_ldm,
    pipeline_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
