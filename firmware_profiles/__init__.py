"""Per-board data files (``*.toml``); ``packager.profiles`` loads and validates them."""
