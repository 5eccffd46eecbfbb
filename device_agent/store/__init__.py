"""The board's data directory: the one owner of every path the agent writes (``layout``), the
files behind the trusted state, the wrapped device keys, durable writes, and the wipe."""
