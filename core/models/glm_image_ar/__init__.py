"""GLM-Image's autoregressive generator and its image tokenizer (the ``glm-image-ar`` model)."""
