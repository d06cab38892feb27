"""asyncio plumbing shared by the node, the router and the client."""
