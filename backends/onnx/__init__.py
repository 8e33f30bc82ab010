"""isthmus.backends.onnx: ONNX export and the ONNX Runtime backend.

* :mod:`~isthmus.backends.onnx.graph` and :mod:`~isthmus.backends.onnx.emit`: a kernel table whose
  ops emit ONNX nodes instead of computing, so running a model's forward with it *is* the export
  (the engine-free exporter; needs neither torch nor MindSpore).
* :mod:`~isthmus.backends.onnx.engine`: ONNX Runtime sessions, and the ``onnxruntime`` backend
  whose kernels run each op as a one-node graph.
* :mod:`~isthmus.backends.onnx.exporters`: the ``kernel``, ``torch`` and ``mindspore`` exporters.

Importing this package imports nothing heavy; ``onnx`` loads with the submodules.
"""
