"""Engine-neutral building blocks: parameter specs, layers, the optimizer, precision policies and
the model protocol. Everything here calls kernels (``k.<op>``), never an engine."""
