"""Precision policies: which tokens of a sealing page deserve more bits. Depends on `quant` only."""
