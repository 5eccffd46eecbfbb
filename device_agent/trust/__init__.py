"""The pure trust core: the board's trusted state and the install and serve decisions, as
functions over verified manifests, state and a reference time. Nothing here does I/O."""
