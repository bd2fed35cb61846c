"""The routes of ``/api/v1``, one module per interface of the record."""
