"""Function and job records: one interface (base.py), one module per backend."""
