"""The backend conformance kit for pytest (``pytest --isthmus-backend=NAME``): the plugin, its
tests and the exclusions file format."""
