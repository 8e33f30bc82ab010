"""isthmus.backends.torch"""

from isthmus.backends.ascend.guard import guard_torch_import

guard_torch_import()  # before any torch import: an installed torch_npu without CANN must not break it
