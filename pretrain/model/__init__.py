"""The bidirectional transformer on megatron-core tensor-parallel layers: its layers and attention, the fused
masked-row head, and the fast weights that can sit on its projections. Knows nothing of losses or training."""
