"""vLLM-facing engine pieces and the `adakv` command line."""
