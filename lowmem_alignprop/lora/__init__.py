"""LoRA files: read, checked, converted between the diffusers, peft, kohya/ComfyUI and original-name formats,
merged, exported with a model card, and an --init-lora split into what a run trains and what it keeps."""
