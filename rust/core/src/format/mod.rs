//! File formats shared with the C++ distributed-llama, byte for byte.
