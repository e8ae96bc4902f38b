"""The attention backend for heterogeneous pages (vLLM's CUSTOM slot)."""
