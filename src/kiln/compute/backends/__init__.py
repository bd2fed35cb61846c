"""Where tasks run. Each backend implements :class:`kiln.compute.backends.base.Backend`."""
