"""The model registry: versions of models made by runs, aliases, promotion and rollback."""
