"""How a step runs on many ranks, knowing nothing of the model beyond the engine contract: topology and
layout checks, collectives, the engines (local, DeepSpeed ZeRO, pipeline) and sharded checkpoints."""
