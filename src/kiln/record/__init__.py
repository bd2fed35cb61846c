"""The system of record: runs, metrics, artifacts, datasets, code and environment snapshots."""
