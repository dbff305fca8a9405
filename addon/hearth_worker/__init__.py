"""Hearth edge worker: serves ONNX models to the Hearth Home Assistant integration."""

__version__ = "0.1.0"
API_VERSION = 1
