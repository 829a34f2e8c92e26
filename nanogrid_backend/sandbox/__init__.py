"""Sandboxes run user code: one interface (base.py), one module per kind (process, docker)."""
