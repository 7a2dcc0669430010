"""dllama: run Llama-family models split across several small devices over TCP."""

from dllama._core import AuthenticationError, ModelFormatError, ProtocolError, __version__

__all__ = ["AuthenticationError", "ModelFormatError", "ProtocolError", "__version__"]
