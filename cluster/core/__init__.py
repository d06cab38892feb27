"""Replication logic as pure state machines: no sockets, no asyncio, no clock, no files."""
