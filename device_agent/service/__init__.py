"""The guarded local service: the HTTP adapter, the query path (tokens, throttle, audit log,
detectors, events) and the ``serve``/``token``/``audit``/``events`` commands."""
