"""Base layer: loading a causal LM (hub id, folder, GGUF, tiny random), its adapters, FSDP2 sharding, decoding."""
