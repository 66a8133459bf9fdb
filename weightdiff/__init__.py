"""weightdiff: the weight difference of two models as a LoRA adapter, by truncated SVD."""
