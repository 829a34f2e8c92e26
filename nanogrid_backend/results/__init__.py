"""Result buses: deliver a finished job to whoever waits on it (one interface, one module per backend)."""
