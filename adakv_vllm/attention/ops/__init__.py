"""Attention over heterogeneous pages: the fp32 oracle (torch_ref) and the fast paths tested against it."""
