"""isthmus.backends.torch"""
