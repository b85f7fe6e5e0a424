"""Checkpoint formats that serving engines load: compressed-tensors (vLLM, SGLang; also quantarena's own
save format) and GGUF (llama.cpp). Every writer checks the whole model first and writes into a temporary
location that is renamed when complete, so a refused scheme or a failure leaves nothing behind."""
from __future__ import annotations

from ..primitives import QuantizationError


class FormatError(QuantizationError):
    """A model or scheme that a format cannot express, or a folder that is not a valid export."""


FORMATS = ("compressed-tensors", "gguf")
