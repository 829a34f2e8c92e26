"""The HTTP API, one module per resource, each a module-level ``APIRouter``; what they depend on is ``deps.py``."""
