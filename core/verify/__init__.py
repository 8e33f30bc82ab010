"""Proof that numbers match: kernel conformance against the float64 reference, the ONNX oracle,
op replay, the portability check and its report, and the hardware selftest."""
