"""isthmus.backends.ascend: what only Ascend has.

CANN detection (:mod:`.detect`, :mod:`.npu_smi`), the ``TORCH_DEVICE_BACKEND_AUTOLOAD`` guard
(:mod:`.guard`), the SoC capability table (:mod:`.soc`), validated precision switches
(:mod:`.options`), the torch engine on ``npu:N`` with torch_npu fused kernel routes (:mod:`.torch`,
:mod:`.routes`), the MindSpore engine on Ascend (:mod:`.mindspore`) and the hardware
acceptance report (:mod:`.selftest`).

Importing this package, :mod:`.detect`, :mod:`.guard`, :mod:`.soc` or :mod:`.options` imports no
engine; only the factories in :mod:`.torch` and :mod:`.mindspore` do.
"""
