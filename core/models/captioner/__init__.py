"""``tiny-captioner``: images to captions (a vision encoder and a prefix-LM text decoder)."""
