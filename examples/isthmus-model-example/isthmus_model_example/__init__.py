"""isthmus-model-example: a small convolutional image classifier as a third-party isthmus model."""
