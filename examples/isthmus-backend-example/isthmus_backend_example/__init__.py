"""An example third-party isthmus backend, discovered through the ``isthmus`` entry point group."""
