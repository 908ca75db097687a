"""The training step shared by the trainer and the planner: the rollout and its loss with the memory features applied, the inputs (prompts, embeddings) it consumes."""
