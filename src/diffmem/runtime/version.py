"""The package version, in the bottom layer so that every layer (the service's build info, the
command line's ``--version``) reads it without importing the package root."""

__version__ = "0.1.0"
