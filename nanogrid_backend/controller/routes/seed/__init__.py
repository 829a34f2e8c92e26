"""The seed platform's HTTP contract (controller.js v2.8), for its UI, BFF, scripts and tests, unchanged.

Mounted twice, at the root and under ``/api``, next to NanoGrid's own API under ``/v1``. Every route here
translates: requests into the same core as ``/v1`` (``jobs.deploy``, ``jobs.submit``, the registry, the same
keys, owners and token buckets), results back into the seed's shapes. Nothing is decided twice.

What differs from ``/v1`` on purpose, because the seed's clients depend on it:
- errors are ``{"error": message}`` (``SeedRoute``), authentication failures ``{"error": "Unauthorized"}``;
- every authenticated route spends a rate-limit token (the original limited only ``/upload`` and ``/run``, which
  let a key poll the others without bound) and says so in ``X-RateLimit-Limit``/``-Remaining``;
- a function id is stable across ``PUT /functions/:id``: each update is a new content-addressed version with
  the same ``stable_id``, so queued calls run the code they were submitted for and the history stays whole;
- ``GET /status/:jobId`` answers 200 ``{"status": "pending"}`` for a job that has not finished *and* for one
  that does not exist (or is another owner's): the seed's clients poll while the status is ``pending``.
"""

from fastapi import APIRouter

from nanogrid_backend.controller.routes.seed import discovery, functions, operations, workers

router = APIRouter()
for part in (discovery, functions, workers, operations):
    router.include_router(part.router)
