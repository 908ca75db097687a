"""The names of the files that runs and commands write and that other commands read: one place for each name."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # a run's lora/ and a diffusers export: save_lora_weights' name
LORA_BASE_FILE = "base_model.json"  # beside a run's LoRA: the fingerprint of the model it was trained on
COMMAND_FILE = "command.txt"  # in the run folder: the command line of each start of the run, one per line
INIT_LORA_DIR = "init_lora"  # in the run folder (--init-lora): the LoRA it started from, as read then (a resume's)
KEPT_LAYERS_NAME = "kept_layers.safetensors"  # in init_lora/: the layers of --init-lora's LoRA the run does not train
# (text encoders, convolutions, other linears): fused into the frozen base for training, written back into its LoRAs
INIT_SOURCE_FILE = "source.json"  # in init_lora/: the file --init-lora named and its SHA-256 (the card's digest)
PROMPTS_FILE = "prompts.json"  # in the run folder: the prompts it trains on (metrics' prompt_ids index them), held out
SAMPLE_DIR = "outputs/sample"  # `sample`'s default --output-dir (taken: outputs/sample-2, ...)
SAMPLE_GRID = "sample_grid.png"  # `sample`'s side-by-side grid
SAMPLE_RESULTS = "sample_results.json"  # `sample`'s rewards and settings
BEST_DIR = "best"  # in the run folder (--eval-every): the LoRA of the best held-out evaluation so far
MERGED_FILE = "merged_loras.json"  # in an `export --merge` folder: the LoRAs fused into it (a single file: its header)
BEST_FILE = "best.json"  # in best/: the step, its eval_reward and the evaluation's settings
LORA_DIR = "lora"  # in the run folder: the trained LoRA (diffusers' layout)
FULL_DIR = "unet"  # in the run folder (train_unet=full): the whole trained UNet
CONFIG_FILE = "config.yaml"  # in the run folder: the resolved configuration (a resume's, an export's model card's)
SUMMARY_FILE = "summary.json"  # in the run folder: the end-of-run summary
METRICS_FILE = "metrics.jsonl"  # in the run folder: one line per optimizer step
CHECKPOINTS_DIR = "checkpoints"  # in the run folder: step-NNNNNNNN/ each
SAMPLES_DIR = "samples"  # in the run folder: the before/after grid and --sample-every's
GRID_FILE = "before_after.png"  # in samples/: before and after training, same seeds
GRID_RECORD = "before_after.json"  # in samples/: the grid's prompts, seeds and rewards
BEFORE_FILE = "before.safetensors"  # in samples/: the images before training, kept for a resume (run/before_images)


def trained_dir(train_unet: str) -> str:
    """The run folder's folder of what it trained: lora/, or unet/ (train_unet=full)."""
    return LORA_DIR if train_unet == "lora" else FULL_DIR


def step_grid_name(step: int) -> str:
    """--sample-every's grid of step ``step`` in samples/ (before vs that step): step-000050.png."""
    return f"step-{step:06d}.png"


def grid_step(name: str) -> int | None:
    """The step of a --sample-every grid's file name (:func:`step_grid_name`); None for another file."""
    import re

    found = re.fullmatch(r"step-(\d+)\.png", name)
    return int(found.group(1)) if found else None
