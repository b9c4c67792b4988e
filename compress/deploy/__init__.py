"""Deployment: bundles for a target (bundle), the runner that travels in them (runner), and the deploy stage (stage)."""
