"""What a user runs: train (the Trainer), sample (evaluate), export of a LoRA, and the image grid they write."""
