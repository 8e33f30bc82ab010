"""Training: the trainer loop, a run assembled from a config, data parallel, checkpoints, durable
writes, the run log, and restoring a trained model from its checkpoint."""
