"""`adakv eval`: quality through the real plugin in vLLM (WikiText-2 KL/PPL, zero-shot tasks, needle)."""
