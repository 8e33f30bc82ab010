"""Decoder-only language models of the Llama, Qwen2 and GLM-4 families, one package with three presets
(``model=llama``, ``model=qwen2``, ``model=glm4``): the architecture, KV-cache generation, the
Hugging Face layout of their checkpoints and the ``generate`` command for text."""
