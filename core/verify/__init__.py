"""Proof that numbers match: kernel conformance against the float64 reference, the ONNX oracle,
dumps and their bundles (dump, capture, recording, replay_dump), their comparison on any machine
(compare, truth, metrics, divergence, replay_check, report), portability (dump + compare on one
machine) and the hardware selftest."""
