"""A training run: the factory that assembles model, step and engine; the trainer and its loop; the data
feed; optimizer schedule, metrics, FLOPs; the state a checkpoint carries; bad-step policy, watchdog, lock."""
