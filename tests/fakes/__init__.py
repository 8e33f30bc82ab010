"""FAKES for what cannot run on the machines these tests run on, and nothing else.

Ascend silicon with its vendor software (CANN, the NPU driver, ``npu-smi``, ``torch_npu``) and CUDA
devices (the NVIDIA driver, ``nvidia-smi``, ``torch.cuda`` of a CUDA build) are absent here, so the
tests that read them read these stand-ins instead. One module per faked thing; each module's
docstring says FAKE, names what it stands in for and cites the vendor source whose layout, output or
schema it follows. Everything else in the tests is the real thing (torch, MindSpore, ONNX Runtime).
"""
