"""Measuring and predicting memory: the per-stage profiler, the no-GPU planner and the reports both write."""
