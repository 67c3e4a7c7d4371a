"""`herder status` and `herder version`."""

from __future__ import annotations

import platform
import time
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    connected,
    resolve,
)
from herder.cli.output import fail, print_json, print_table, run
from herder.client import discovery
from herder.client.connection import display_nats_url
from herder.client.requests import Client
from herder.protocol.errors import HerderError
from herder.protocol.messages import HealthCheck, HealthReply
from herder.protocol.version import SCHEMA_VERSION, VERSION


def status(
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show the services that answer (instances, requests, errors, latency), NATS and the database."""
    target = resolve(data_dir, url, token_file, bundle)
    report = run(lambda: _gather(target))
    if json_out:
        print_json(report)
    else:
        _show(report)
    if not report["services"]:
        fail(
            f"NATS answers at {report['nats']['url']} but no herder service does; "
            "start them with 'herder up' or 'herder service run'"
        )


async def _gather(target: Target) -> dict[str, Any]:
    async with connected(target, "herder-cli") as nc:
        services = [s.as_dict() for s in discovery.summarize(await discovery.gather(nc))]
        return {
            "nats": await _nats_health(nc),
            "services": services,
            "database": await _database_health(nc, target),
            "components": await _troubled_components(nc, target, [s["name"] for s in services]),
        }


async def _troubled_components(nc: NATS, target: Target, services: list[str]) -> list[dict[str, Any]]:
    """Background components (sweeps, bucket mirrors) of the services that are not running as they
    should: restarting after a failure, or stopped. One instance of each service answers."""
    client = Client(nc, token=target.token, tenant=target.tenant, timeout=2.0)
    troubled = []
    for name in services:
        try:
            health = await client.request(HealthCheck(), service=name)
        except HerderError:
            continue
        assert isinstance(health, HealthReply)
        for component in health.components:
            if component.status != "running":
                troubled.append({"service": name, "instance": health.instance, **component.model_dump(mode="json")})
    return troubled


async def _nats_health(nc: NATS) -> dict[str, Any]:
    started = time.perf_counter()
    await nc.flush()
    rtt_ms = (time.perf_counter() - started) * 1000
    report: dict[str, Any] = {
        "url": display_nats_url(nc.connected_url.geturl() if nc.connected_url else ""),
        "server_version": nc.connected_server_version._server_version,
        "rtt_ms": round(rtt_ms, 3),
        "max_payload": nc.max_payload,
    }
    try:
        account = await nc.jetstream().account_info()
        report["jetstream"] = {
            "streams": account.streams,
            "consumers": account.consumers,
            "storage": account.storage,
        }
    except nats.errors.Error as exc:
        report["jetstream"] = {"error": str(exc) or type(exc).__name__}
    return report


async def _database_health(nc: NATS, target: Target) -> dict[str, Any] | None:
    """The database as the auth service sees it (every service answers `health`)."""
    client = Client(nc, token=target.token, tenant=target.tenant, timeout=2.0)
    try:
        health = await client.request(HealthCheck(), service="auth")
    except HerderError as exc:
        return {"ok": None, "error": f"unknown: {exc.message}", "seen_by": "auth"}
    assert isinstance(health, HealthReply)
    if health.database is None:
        return None
    return {**health.database.model_dump(mode="json"), "seen_by": f"{health.service} {health.instance}"}


def _show(report: dict[str, Any]) -> None:
    n = report["nats"]
    js = n.get("jetstream", {})
    js_text = (
        f"JetStream: {js['streams']} streams, {js['storage']} bytes"
        if "streams" in js
        else f"JetStream: {js.get('error')}"
    )
    print(f"NATS      {n['url']}  nats-server {n['server_version']}  rtt {n['rtt_ms']:.2f} ms  {js_text}")
    db = report["database"]
    if db is None:
        print("database  (no service reported one)")
    elif db.get("ok"):
        print(f"database  {db['dialect']}  ok  {db['latency_ms']:.2f} ms  (seen by {db['seen_by']})")
    elif db.get("ok") is None:
        print(f"database  {db.get('error')}")
    else:
        print(f"database  NOT OK: {db.get('error')}  (seen by {db.get('seen_by')})")
    print()
    rows = [
        (
            s["name"],
            ", ".join(s["versions"]),
            s["instances"],
            s["requests"],
            s["errors"],
            "-" if s["average_ms"] is None else f"{s['average_ms']:.2f} ms",
        )
        for s in report["services"]
    ]
    print_table(["SERVICE", "VERSION", "INSTANCES", "REQUESTS", "ERRORS", "AVG LATENCY"], rows)
    for component in report.get("components", []):
        error = f"; last error: {component['last_error']}" if component.get("last_error") else ""
        print(
            f"{component['service']} {component['instance']}: {component['name']} is {component['status']} "
            f"({component['restarts']} restarts){error}"
        )


def version(json_out: JsonOption = False) -> None:
    """Show herder's version and the wire schema it speaks."""
    info = {"herder": VERSION, "schema": SCHEMA_VERSION, "python": platform.python_version()}
    if json_out:
        print_json(info)
    else:
        print(f"herder {VERSION} (wire schema {SCHEMA_VERSION}, Python {info['python']})")
