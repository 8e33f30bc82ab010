"""isthmus.backends.cpu: the host CPU device, for the torch and MindSpore engines."""
