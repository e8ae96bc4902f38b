"""Pages with a bit map, FP16 staging and the seal planner. vLLM is imported only in spec.py."""
