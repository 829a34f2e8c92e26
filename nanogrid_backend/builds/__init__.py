"""Function environments on the grid: building each one's packages once (``builder``), the shared layers they are
made of (``layers``), which sandboxes use them (``users``) and the modules a stem cell imports ahead (``preload``)."""
