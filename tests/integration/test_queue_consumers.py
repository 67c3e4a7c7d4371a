"""Eight robots (real agents running real scripts, through the SDK) share 10,000 queue items: every item
is processed exactly once. On SQLite with the one queues service a SQLite stack runs; on PostgreSQL with
two replicas of it sharing the database (NATS shares the requests out between them).

Each script writes the id of every item it takes to a marker file of its own before completing it;
the markers together must hold every item once, and the queue must say every item is Successful.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from herder.client import discovery
from herder.protocol.jobs import JobStart, JobState
from herder.protocol.queues import ItemAdd, NewItem, QueueCreate, QueueShow
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.queues.service import QueuesService
from tests.fleet import Fleet, python_process, running_fleet

# A rig of eight robot agents and ten thousand items: minutes on a busy 2-core machine, not the suite's 180 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ITEMS = 10_000
ROBOTS = 8
ADD_CHUNK = 2_000

CONSUMER = """
import os
from herder.robot import sdk


def main(data):
    queue = sdk.queue(data["queue"])
    taken = 0
    with open(os.path.join(data["markers"], os.environ["HERDER_JOB_ID"]), "a") as marker:
        while True:
            # Half the robots take one item at a time, half a batch: both paths claim.
            items = queue.next_batch(data["batch"]) if data["batch"] > 1 else [queue.next()]
            items = [item for item in items if item is not None]
            if not items:
                return {"taken": taken}
            for item in items:
                marker.write(item.id + "\\n")
                marker.flush()
                item.complete({"n": item.content["n"]})
                taken += 1
"""


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        yield started


async def test_eight_robots_process_ten_thousand_items_exactly_once(
    fleet: Fleet, nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential
) -> None:
    replicas = 2 if db_url.startswith("postgresql") else 1
    extra = [
        ServiceHost(
            HostConfig(
                nats_url=nats_url,
                db_url=db_url,
                services=(QueuesService,),
                credential=credential,
                data_dir=tmp_path / f"replica-{n}",
                migrate=False,
            )
        )
        for n in range(replicas - 1)
    ]
    for host in extra:
        await host.start()
    try:
        await fleet.client.request(QueueCreate(name="work"))
        for start in range(0, ITEMS, ADD_CHUNK):
            items = [NewItem(content={"n": n}) for n in range(start, min(start + ADD_CHUNK, ITEMS))]
            await fleet.client.request(ItemAdd(queue="work", items=items), timeout=60.0)
        await fleet.publish(python_process(tmp_path, "consumer", CONSUMER))
        markers = tmp_path / "markers"
        markers.mkdir()
        names = [f"c{n}" for n in range(ROBOTS)]
        await asyncio.gather(*(fleet.run_robot(name) for name in names))
        jobs = [
            await fleet.client.request(
                JobStart(
                    process="consumer",
                    robot=name,
                    input={"queue": "work", "markers": str(markers), "batch": 1 if n % 2 else 25},
                )
            )
            for n, name in enumerate(names)
        ]
        ended = await asyncio.gather(*(fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=240.0) for job in jobs))
        taken = Counter(line for path in markers.iterdir() for line in path.read_text().split())
        assert len(taken) == ITEMS
        assert [item for item, count in taken.items() if count > 1] == []  # no double claims
        assert sum((job.output or {}).get("taken", 0) for job in ended) == ITEMS
        assert all((job.output or {}).get("taken", 0) > 0 for job in ended)  # every robot took a share
        counts = (await fleet.client.request(QueueShow(name="work"))).stats.counts
        assert counts["Successful"] == ITEMS and counts["New"] == 0 and counts["InProgress"] == 0
        if replicas > 1:  # both replicas served robots' requests
            stats = [reply for reply in await discovery.gather(fleet.nc) if reply["name"] == "queues"]
            assert len(stats) == replicas
            for reply in stats:
                assert any(e["name"] == "item_next" and e["num_requests"] > 0 for e in reply["endpoints"]), stats
    finally:
        for host in extra:
            await host.stop()
