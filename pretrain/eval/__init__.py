"""A trained model in use: loading a checkpoint for inference, the MDLM sampler, held-out loss and
likelihoods, the needle-in-a-haystack suite and the lm-evaluation-harness model."""
