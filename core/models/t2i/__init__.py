"""``tiny-t2i``: captions to images (visual codes from a transformer, pixels from a diffusion decoder)."""
