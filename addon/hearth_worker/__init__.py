"""Hearth edge worker: serves ONNX models to the Hearth Home Assistant integration."""

import os

# onnxruntime and onnxruntime-genai (their Linux wheels too) collect usage telemetry
# by default: a device id and an event database under ~/.cache/Microsoft/DeveloperTools,
# uploaded to Microsoft whenever the machine can reach it. A household worker sends
# nothing out of the home and keeps nothing: switch it off before either library loads.
# (Every engine module imports this package first.)
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
API_VERSION = 1
