"""Blob stores for code packages and output files: one interface (base.py), one module per backend."""
