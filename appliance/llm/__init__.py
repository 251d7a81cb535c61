"""Local inference: the model registry, the worker process and its protocol, the scheduler."""
