"""The run: a plan of typed stages (plan, context), measured alike on every runtime (measure), by one
orchestrator (pipeline)."""
