"""docs/PROTOCOL.md lists exactly the fields a live node's ``status`` reply carries."""

from __future__ import annotations

import pytest

from cluster.local import LocalCluster
from tests.e2e.conftest import node_status, wait_for
from tests.unit.test_protocol_doc import DOC, _table

pytestmark = pytest.mark.e2e


def _documented(marker: str) -> set[str]:
    return {row[0].strip("`") for row in _table(DOC.read_text(encoding="utf-8"), marker)}


async def test_status_fields_are_the_documented_ones(cluster: LocalCluster) -> None:
    async def linked() -> bool:
        return bool((await node_status(cluster.addresses["n2"]))["master_link"]["up"])

    await wait_for(linked, "n2 to link to the master")
    common = _documented("status-node")
    master = await node_status(cluster.addresses["n1"])
    slave = await node_status(cluster.addresses["n2"])
    assert set(master) == common | _documented("status-master")
    assert set(slave) == common | _documented("status-slave")
    assert slave["master_link"]["state"] == "streaming"


async def test_router_status_rows_are_the_documented_ones(cluster: LocalCluster) -> None:
    documented = _documented("status-router-node")
    await cluster.kill("n3")

    async def n3_down() -> bool:
        return not (await node_status(cluster.router_address))["nodes"][2]["up"]

    await wait_for(n3_down, "the router to mark n3 down")
    rows = {r["id"]: r for r in (await node_status(cluster.router_address))["nodes"]}
    assert set(rows["n3"]) == documented
    for n in ("n1", "n2", "n4"):
        assert set(rows[n]) == documented - {"error"}, n
    assert rows["n1"]["majority_index"] == rows["n1"]["last_index"]
    assert isinstance(rows["n2"]["last_contact_ms"], int)
