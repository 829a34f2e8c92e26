"""NanoGrid's server side: the controller, the worker agent, sandboxes and storage adapters."""
