"""llmlb: an OpenAI-compatible load balancer over a fleet of llama.cpp nodes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmlb")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
