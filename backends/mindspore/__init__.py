"""isthmus.backends.mindspore: the MindSpore engine (PyNative mode, kernels on ``mindspore.ops``).

Importing this package imports no engine: MindSpore loads only when ``engine`` or ``kernels`` is
imported, which a backend factory does once the backend is chosen.
"""
