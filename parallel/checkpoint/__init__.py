"""Sharded, verified, reshardable checkpoints on torch.distributed.checkpoint: the per-parameter state every
engine hands over (``sharded_state``), the manifest that verifies a checkpoint (``manifest``), the collective
saver and loader of a run (``checkpointer``) and one-process readers of the weights (``reading``)."""
