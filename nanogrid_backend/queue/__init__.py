"""Job queues: one interface (base.py), one module per backend."""
