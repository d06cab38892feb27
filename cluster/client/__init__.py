"""The asyncio client library."""

from cluster.client.client import Client, GetResult
from cluster.client.connection import Connection
from cluster.types import Token

__all__ = ["Client", "Connection", "GetResult", "Token"]
