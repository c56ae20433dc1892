"""What a run directory holds and how it is written: its file names, lock, metrics and summary (``rundir``) and the
checkpoint format with its safe loading (``checkpoint``). Atomic file writes are ``transformer_ln.atomic``."""
