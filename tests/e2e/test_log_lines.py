"""Log lines that give a reason give a non-empty one: a slave that goes silent ends its
replication link on the master with the reason written out (it used to read
``replication link to n2 closed: ``, the text of a bare ``TimeoutError``)."""

from __future__ import annotations

import re
import signal

import pytest

from cluster.local import LocalCluster
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e


async def test_a_silent_slave_s_link_closes_with_a_reason(cluster: LocalCluster) -> None:
    log = cluster.children["n1"].log_path
    cluster.signal("n2", signal.SIGSTOP)
    try:
        async def logged() -> bool:
            return "replication link to n2 closed" in log.read_text(errors="replace")

        await wait_for(logged, "the master to close n2's link")
    finally:
        cluster.signal("n2", signal.SIGCONT)
    text = log.read_text(errors="replace")
    for line in re.findall(r"^.*replication link to n2 closed.*$", text, re.MULTILINE):
        assert not line.rstrip().endswith(":"), f"no reason given: {line!r}"
