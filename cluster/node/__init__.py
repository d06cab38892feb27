"""The asyncio shell around the replication core: one data node."""
