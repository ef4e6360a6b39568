"""Private implementation of optax_sam; import public names from ``optax_sam``."""
