#!/usr/bin/env bash
# GPU check: real AlignProp steps of SD1.5/SDXL-shaped random-weight models under each GPU profile,
# each process capped at the profile's budget with torch.cuda.set_per_process_memory_fraction, plus
# the planner's estimate of the same configuration and the nf4/int8 base UNet check. Offline.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]   (OUT_DIR default: $OUT, else benchmarks/results)
#
# One call on an 80 GB card does everything in about 7 minutes with three trainings at a time (the loading item,
# a FLUX.1-shaped file read to the card whole and block by block, takes about one of them):
#   JOBS=3 DEADLINE=330 bash benchmarks/gpu_check.sh   (runs start until 330 s; each takes 1-4 min)
# (memory figures are per run; seconds per step then include the contention: JOBS=1 for timings).
# The speed rows (--only speed: compile, channels_last, fused AdamW, merge_lora_nograd, tf32 and plan --fastest's choice, one at a
# time on SD1.5 batch 1 under rtx4090) need JOBS=1 to be a timing: about 8 minutes on their own.
# When the 8 GB FLUX row is done, `sample` runs with its LoRA under that profile and cap (about a minute; that
# row must run in the same call: --match rtx3060-flux runs both).
# Split over calls with --match (comma-separated words of run names) or --only
# ladder,profiles,quant,loading,sample,speed;
# calls on the same day and device merge into one results file, saved after every run (a call killed at its
# time limit keeps what it measured).
#
# Seen on an H200 (2026-12-04): six SD3.5/FLUX rows at once took 160-240 s each with OMP_NUM_THREADS=2 (16 cores: the
# text encoders run on the CPU); the int8 FLUX rows (rtx3060-flux, rtx4090-flux) ran past 240 s that way: give them
# a call of their own, e.g. JOBS=2 DEADLINE=300 bash benchmarks/gpu_check.sh --only profiles,sample --run-timeout 330
# --match "int8 block swap 41,rtx4090-flux flux 1024 int8" (the sample row starts after its training row only before
# DEADLINE; both rows together can take the whole 600 s call). A device's copy may carry stale git metadata: set
# GPU_CHECK_CODE=<commit> in the command so the results file names the code that ran.
#
# Before a device call, its plumbing on this CPU (tiny model, about 90 s; in `-m slow`, not the default suite):
#   python -m pytest -q -m slow tests/test_gpu_check.py
#
# The GPU's Python needs torch with CUDA, transformers, accelerate and peft. Packages it lacks
# (diffusers, bitsandbytes) are installed from wheels in .whl/ when present; make them on a networked
# machine with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 bitsandbytes==0.50.2
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT_DIR="$1"; shift; fi
need=()
for pkg in diffusers bitsandbytes; do
  python3 -c "import $pkg" 2>/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  wheels=()
  for pkg in "${need[@]}"; do wheels+=(.whl/"$pkg"-*.whl); done
  echo "installing from .whl/: ${need[*]}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
python3 benchmarks/gpu_check.py --out "$OUT_DIR" --deadline "${DEADLINE:-400}" --jobs "${JOBS:-1}" "$@"
