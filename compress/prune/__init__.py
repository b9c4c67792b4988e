"""Structured pruning of attention heads and MLP units (structured), and the prune and recover stages (stage)."""
