"""`jobs.start_batch`: many starts in one transaction, each idempotent under its own key, on SQLite
and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from herder.protocol import codec, subjects
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Forbidden
from herder.protocol.jobs import JobListRequest, JobStart, JobStartBatch, JobState, Strategy, WhenBusy
from herder.services.common.credentials import ServiceCredential
from tests.fleet import Fleet, python_process, running_fleet


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        await started.publish(python_process(tmp_path, "tick", "def main():\n    return {}\n"))
        await started.add_robot("r1", groups=["pool"])
        yield started


def start(key: str, **fields: object) -> JobStart:
    return JobStart(**{"process": "tick", "group": "pool", "request_id": key, **fields})


async def test_a_batch_makes_each_job_once_and_refuses_alone_what_it_must(fleet: Fleet) -> None:
    batch = JobStartBatch(
        starts=[
            start("k1", input={"n": 1}),
            start("k2", process="nope"),  # unknown process: refused alone
            start("k3", when_busy=WhenBusy.SKIP),  # r1 is offline: skipped alone
            start("k4", input={"n": 4}),
        ]
    )
    first = (await fleet.client.request(batch)).results
    assert [result.job is not None for result in first] == [True, False, False, True]
    assert first[1].error is not None and first[1].error.code == "not_found"
    assert (
        first[2].error is not None and first[2].error.code == "conflict" and "busy or offline" in first[2].error.message
    )
    made = {first[0].job.id, first[3].job.id}  # type: ignore[union-attr]
    assert all(result.job.state is JobState.PENDING for result in (first[0], first[3]))  # type: ignore[union-attr]

    # The same keys again, in a batch or alone: the same jobs, nothing more.
    again = (await fleet.client.request(batch)).results
    assert {again[0].job.id, again[3].job.id} == made  # type: ignore[union-attr]
    alone = await fleet.client.request(JobStart(process="tick", group="pool", input={"n": 1}), idempotency_key="k1")
    assert alone.id == first[0].job.id  # type: ignore[union-attr]
    # A key reused for another request is refused.
    changed = (await fleet.client.request(JobStartBatch(starts=[start("k4", input={"n": 5})]))).results[0]
    assert changed.error is not None and "different request" in changed.error.message
    assert {job.id for job in (await fleet.client.request(JobListRequest())).jobs} == made


async def test_a_batch_must_key_every_start_and_only_the_scheduler_names_triggers(fleet: Fleet) -> None:
    # What the client's models refuse, the service refuses too, at its edge.
    for body, words in (
        ({"starts": [{"process": "tick", "group": "pool"}]}, "needs its request_id"),
        ({"starts": [start("same").model_dump(mode="json")] * 2}, "request_ids of their own"),
        ({"starts": []}, "at least 1"),
    ):
        reply = await fleet.nc.request(
            subjects.service(fleet.tenant, "jobs", "start_batch"),
            json.dumps(body).encode(),
            headers={Header.CONTENT_TYPE: codec.JSON, Header.AUTHORIZATION: BEARER + fleet.admin_token},
            timeout=10,
        )
        with pytest.raises(BadRequest, match=words):
            codec.raise_error_reply(reply.data, reply.headers or {})
    with pytest.raises(Forbidden, match="only the scheduler"):
        await fleet.client.request(JobStartBatch(starts=[start("t1", trigger="forged")]))


async def test_fewest_pending_aims_each_job_at_the_least_waited_for_robot_of_the_group(fleet: Fleet) -> None:
    # No robot of the group runs: each job goes to the one with the fewest jobs waiting for it by name.
    await fleet.add_robot("r2", groups=["pool"])
    targets: list[str | None] = []
    for _ in range(4):
        job = await fleet.client.request(JobStart(process="tick", group="pool", strategy=Strategy.FEWEST_PENDING))
        assert job.target_group is None and "fewest jobs waiting" in job.reason, job.reason
        targets.append(job.target_robot)
    assert sorted(target or "" for target in targets) == ["r1", "r1", "r2", "r2"]
    batch = JobStartBatch(starts=[start(f"f{n}", strategy=Strategy.FEWEST_PENDING) for n in range(2)])
    made = [result.job for result in (await fleet.client.request(batch)).results]
    assert all(job is not None and job.target_robot in ("r1", "r2") for job in made)
