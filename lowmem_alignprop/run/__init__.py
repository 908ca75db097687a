"""A run's life on disk and across processes: the run folder and its lock, checkpoints, faults (out-of-memory recovery, signals), distributed set-up and the hub cache."""
