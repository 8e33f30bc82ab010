"""The ``isthmus`` command line: the entry point, the run and verification commands, and the
``register_commands`` hook through which models and plugins add their own. Imports no engine."""
