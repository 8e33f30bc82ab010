"""Kernel routes of the cpu backend: none. The generic torch and MindSpore kernels are the CPU's own
(the torch engine's ``adamw_update`` already takes torch's fused CPU step where it is exact: see
:mod:`isthmus.backends.torch.optim`). The module is here so that every device folder has the same
shape (``detect``, ``options``, ``routes``); a CPU-specific route would be listed here."""

ROUTED_OPS: tuple[str, ...] = ()
