"""The Trainer: setup, the step and the loop, with the phases beside it (a resume's records, the renders without
gradient, faults, held-out evaluation, the outputs at the end and the summary box)."""
