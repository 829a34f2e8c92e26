"""What an environment spec may name, and its id: the same spec always gives the same ``env-...`` id."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

PLATFORM = (
    "x86_64-manylinux_2_28"  # the wheels' platform: the grid's runtime images run glibc 2.36+
)
# A pin or range for one distribution, never a URL, path or installer option.
REQUIREMENT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(\[[A-Za-z0-9._,-]{1,100}\])?"
    r"(\s*(===|==|~=|!=|>=|<=|>|<)\s*[A-Za-z0-9.*+!_-]{1,64}(\s*,\s*(===|==|~=|!=|>=|<=|>|<)\s*"
    r"[A-Za-z0-9.*+!_-]{1,64})*)?$"
)
SYSTEM_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")  # a Debian package name
# what apt reads as a regular expression in a name: '.+', '..', 'zsh.'
SYSTEM_PATTERN = re.compile(r"\.[.+]|\.$")
PYTHONS = (
    "3.9",
    "3.10",
    "3.11",
    "3.12",
    "3.13",
    "3.14",
)  # the minor versions a runtime can be built for
VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
RESERVED_VARIABLES = ("NANOGRID_", "PYTHON", "PATH", "HOME", "LD_")  # the sandbox's own settings


def distribution_name(requirement: str) -> str:
    """The normalised distribution name of a requirement (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[=<>!~]", requirement, maxsplit=1)[0]).lower()


def environment_id(spec: Mapping[str, Any]) -> str:
    return "env-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
