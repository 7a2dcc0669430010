# Hand-written stub of the Rust extension; checked with `python -m mypy.stubtest dllama._core`.

import os
from typing import final

import numpy as np
import numpy.typing as npt

from dllama._types import TensorSpec as TensorSpec
from dllama._types import TokenizerDict as TokenizerDict

__all__ = [
    "FLOAT_TYPES",
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "BandwidthReader",
    "ModelFormatError",
    "Node",
    "ProtocolError",
    "TensorSpec",
    "TokenizerDict",
    "__version__",
    "dequantize",
    "encode_model_header",
    "model_tensors",
    "quantize",
    "read_bandwidth",
    "read_model_header",
    "read_model_tensor",
    "read_tokenizer",
    "serve_worker",
    "write_tokenizer",
]

__version__: str

class ModelFormatError(ValueError): ...
class ProtocolError(ConnectionError): ...
class AuthenticationError(ProtocolError): ...

# --- kernels -------------------------------------------------------------------------------

def quantize(x: npt.NDArray[np.float32], float_type: str) -> bytes: ...
def dequantize(data: bytes, float_type: str) -> npt.NDArray[np.float32]: ...
def read_bandwidth(nbytes: int, nthreads: int, rounds: int = 5) -> float: ...
@final
class BandwidthReader:
    """A buffer that `nthreads` threads read again and again; `read()`: bytes/s of one pass."""

    def __new__(cls, nbytes: int, nthreads: int) -> BandwidthReader: ...
    def read(self) -> float: ...

# --- format --------------------------------------------------------------------------------

#: The format's float type names and their header codes (`weights_float_type`):
#: {"f32": 0, "f16": 1, "q40": 2, "q80": 3}.
FLOAT_TYPES: dict[str, int]

def encode_model_header(fields: dict[str, int | float]) -> bytes: ...
def read_model_header(path: str | os.PathLike[str]) -> dict[str, int | float]: ...
def model_tensors(fields: dict[str, int | float]) -> list[TensorSpec]: ...
def read_model_tensor(path: str | os.PathLike[str], name: str) -> npt.NDArray[np.float32]: ...
def read_tokenizer(path: str | os.PathLike[str]) -> TokenizerDict: ...
def write_tokenizer(path: str | os.PathLike[str], tok: TokenizerDict) -> None: ...

# --- node ----------------------------------------------------------------------------------

@final
class Node:
    """One node of the model (on one machine: the whole model)."""

    def __new__(
        cls,
        model_path: str | os.PathLike[str],
        *,
        nthreads: int = 1,
        buffer_float_type: str = "q80",
        max_seq_len: int = 0,
        weights_float_type: str | None = None,
        workers: list[str] | None = None,
        secret: str | None = None,
        ready_timeout: float = 600.0,
        max_memory: int | None = None,
    ) -> Node: ...
    def forward(
        self, tokens: list[int], pos: int, out: npt.NDArray[np.float32] | None = None
    ) -> npt.NDArray[np.float32]: ...
    @property
    def last_inference_ms(self) -> float: ...
    @property
    def last_transfer_ms(self) -> float: ...
    @property
    def last_sent_bytes(self) -> int: ...
    @property
    def last_recv_bytes(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def model_max_seq_len(self) -> int: ...
    @property
    def weights_float_type(self) -> str: ...
    @property
    def buffer_float_type(self) -> str: ...
    @property
    def nthreads(self) -> int: ...
    @property
    def kv_cache_bytes(self) -> int: ...
    @property
    def weight_bytes_per_token(self) -> int: ...
    @property
    def kernels(self) -> str: ...
    @property
    def n_nodes(self) -> int: ...

# cluster (rust/python/src/net.rs)
PROTOCOL_VERSION: int

def serve_worker(
    host: str,
    port: int,
    *,
    nthreads: int = 1,
    model: str | None = None,
    secret: str | None = None,
    step_timeout: float = 60.0,
    idle_timeout: float = 3600.0,
    handshake_timeout: float = 10.0,
    build_timeout: float = 600.0,
    max_memory: int | None = None,
) -> None: ...
