"""Checkpoint and tokenizer conversion to distributed-llama's `.m` and `.t` files."""
