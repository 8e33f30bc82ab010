"""isthmus.backends.cuda: what only NVIDIA GPUs have.

Driver and device detection without importing torch (:mod:`.detect`), validated options with an
explicit TF32 policy (:mod:`.options`), the torch engine on ``cuda:N`` with its manifest, memory
statistics and ``torch.compile`` fallback (:mod:`.torch`), and kernel routes to SDPA flash /
memory-efficient attention, ``torch._fused_rms_norm`` and ``torch._fused_adamw_`` (:mod:`.kernels`).

Importing this package, :mod:`.detect`, :mod:`.options` or :mod:`.kernels` imports no engine; only
the factory in :mod:`.torch` does.
"""
