"""Training: the loop (loop), torchrun process groups (distributed), the `compress train` job (job), and
distillation (distill)."""
