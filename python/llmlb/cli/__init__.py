"""The ``llmlb`` command line."""
