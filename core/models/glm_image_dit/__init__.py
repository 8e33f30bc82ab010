"""GLM-Image's DiT decoder (diffusers' ``GlmImageTransformer2DModel``), its flow-matching sampler,
its diffusers checkpoint layout and a synthetic latent dataset to train it on."""
