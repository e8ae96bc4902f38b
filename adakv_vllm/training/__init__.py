"""Offline training of the learned precision controller (`adakv train-controller`).

Not imported at serve time."""
