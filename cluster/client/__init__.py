"""The asyncio client library."""

from cluster.client.client import Client, GetResult
from cluster.client.connection import Connection

__all__ = ["Client", "Connection", "GetResult"]
