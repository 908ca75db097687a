"""The shared vocabulary of a training step (docs/design.md section 1).

The profiler, the planner, the reports and the logs use exactly these names, in this order.
"""

LOAD = "load"
ENCODE_PROMPTS = "encode_prompts"
SAMPLE_NOGRAD = "sample_nograd"
SAMPLE_GRAD = "sample_grad"
DECODE = "decode"
REWARD = "reward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"

STAGES = (LOAD, ENCODE_PROMPTS, SAMPLE_NOGRAD, SAMPLE_GRAD, DECODE, REWARD, BACKWARD, OPTIMIZER)
# The stages that run inside every optimizer step (load runs once).
STEP_STAGES = STAGES[1:]
