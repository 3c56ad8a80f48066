"""The ``islands`` command line."""
