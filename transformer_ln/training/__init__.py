"""Training: the loop (``trainer``) and its parts (``checkpointer``, ``resume``, ``validator``), the task seam
(``task``: what the loop needs from a model and its data), one optimizer update (``update``), FSDP (``sharding``),
the schedule, the losses, the divergence guard, the launcher watch and sweeps."""
