"""The toy world: procedural scenes with captions, exact evaluators, and (later) a toy text-to-image model.

``scenes``   scene descriptions, a seeded sampler, the caption grammar, the renderer, the train/held-out split.
``fidelity`` exact (non-differentiable, weight-free) evaluators: segmentation back into objects, prompt
             fidelity against a caption, and the real JPEG file size.

See docs/toy_world.md.
"""

from .scenes import (  # noqa: F401
    BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES, WORLD_VERSION, Content, Obj, Scene, caption, content,
    heldout_prompts, parse_caption, render, render_batch, sample_scene, sample_scenes, split_of, train_prompts,
)
