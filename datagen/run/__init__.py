"""``datagen run`` / ``resume``: the driver loop and what it owns."""
