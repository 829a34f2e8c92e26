"""The contract between NanoGrid's client and its grid: what both sides agree on, in the standard library only.

The client (``nanogrid``) and the grid (``nanogrid_backend``) import this package and nothing of each other (the
client starts an embedded grid through ``nanogrid_backend.entry`` alone). What lives here:

- ``errors``: the exception classes and the failure kinds a job ends with (``failure_for``);
- ``packages``: the function package format (a deterministic zip with ``manifest.json``) and its content id;
- ``environments``: what an environment spec may name (requirements, Debian packages, variables) and its id;
- ``volumes`` and ``schedules``: the names, paths and timings both sides check the same way.
"""

__version__ = "0.1.0"
