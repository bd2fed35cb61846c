"""Environments: declared packages resolved with uv into a locked, content-addressed,
cached virtual environment (see :class:`kiln.envs.spec.Env`, :mod:`kiln.envs.manager`)."""
