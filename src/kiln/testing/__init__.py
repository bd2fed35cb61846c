"""Fakes that implement Kiln's real interfaces, for testing code built on top of them."""

from kiln.testing.backend import FakeBackend
from kiln.testing.stores import (
    MemoryBlobStore,
    MemoryEndpointStore,
    MemoryRegistryStore,
    MemoryStore,
)

__all__ = [
    "FakeBackend",
    "MemoryBlobStore",
    "MemoryEndpointStore",
    "MemoryRegistryStore",
    "MemoryStore",
]
