"""The seed platform's function SDK (``import sdk``), for functions written against it.

The helpers its runner used, reading what NanoGrid's bootstrap sets for each call: ``PAYLOAD`` (or
``PAYLOAD_FILE`` above 100 KB), ``JOB_ID``, ``FUNCTION_ID``, ``MEMORY_MB``, ``LLM_MODEL``, ``OUTPUT_DIR``.
Standard library only, so it loads in every runtime image.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def get_input() -> Any:
    """This call's event: the JSON of ``PAYLOAD_FILE`` if set (payloads over 100 KB), else of ``PAYLOAD``."""
    path = os.environ.get("PAYLOAD_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return json.loads(os.environ.get("PAYLOAD") or "{}")


def get_context() -> dict[str, Any]:
    """The call's context as the seed's runner built it (a dict)."""
    memory = os.environ.get("MEMORY_MB")
    return {
        "request_id": os.environ.get("JOB_ID"),
        "job_id": os.environ.get("JOB_ID"),
        "function_id": os.environ.get("FUNCTION_ID"),
        "memory_mb": int(memory) if memory and memory.isdigit() else None,
        "llm_model": os.environ.get("LLM_MODEL"),
        "output_dir": get_output_dir(),
    }


def get_output_dir() -> str:
    """Where files written become the call's output files (created if missing)."""
    path = os.environ.get("OUTPUT_DIR") or "/output"
    os.makedirs(path, exist_ok=True)
    return path


def output_path(name: str) -> str:
    """A path for an output file called ``name`` (no directories outside the output directory)."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"output file name {name!r} must stay inside the output directory")
    return os.path.join(get_output_dir(), name)


def save_output(name: str, data: object) -> str:
    """Write ``data`` (bytes, text, or anything JSON can encode) as the output file ``name``; returns its path."""
    path = output_path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    content: bytes | str
    if isinstance(data, bytes):
        mode, content = "wb", data
    else:
        mode, content = "w", data if isinstance(data, str) else json.dumps(data)
    with open(path, mode) as f:
        f.write(content)
    return path


def return_output(result: object) -> None:
    """Print the result as JSON on stdout, as the seed's runner did (NanoGrid also returns it as ``result``)."""
    print(json.dumps(result))
    sys.stdout.flush()
