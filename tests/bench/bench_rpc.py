"""RPC round trip: herder's service runtime against a raw nats-py request/reply of the same bytes.

Run it with `make bench` or `.venv/bin/python tests/bench/bench_rpc.py [--json]`.

One isolated nats-server is started (herder's `EmbeddedNats`, temporary store). A child process
serves on it, over one connection:

* `herder`: a `Service` with one no-op endpoint (`bench.noop`), run by `ServiceRunner`, with a
  live `TokenResolver`; every request goes through headers, the bearer-token check, pydantic
  validation and msgpack both ways, called with herder's `Client`;
* `raw`: a plain `nc.subscribe(subject, cb=...)` responder doing `await msg.respond(msg.data)`,
  called with a plain `nc.request(subject, payload)`, where the payload is `codec.dump` of the
  very request the herder caller sends.

The caller connects as a client with its own token, admitted through the auth callout (which the
child answers, as herder's auth service does), so every message passes the fence's permission
checks in nats-server; the child connects with the stack's service credential. The whole run is
made twice in one go: on a fenced server, then on a plain one without authorization (possible for
this benchmark only: herder's services refuse such a server), to show what the fence costs.

The parent process is the caller: one caller in sequence, then CONCURRENCY concurrent callers.
Both sides run in alternating rounds so that drift on the machine hits them alike. It prints
p50/p99 latency (microseconds), requests per second, the CPU time the caller and the responder
process spent per request, and the ratios herder/raw. The target is a
herder p50 within TARGET_P50_RATIO of raw; the script reports it and always exits 0 on a
completed run: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from benchlib import environment, percentile

from herder.client import logs
from herder.client.connection import Credentials, connect, sync
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Principal, PrincipalKind, Role
from herder.protocol.messages import Model, Request
from herder.services.auth.callout import Callout
from herder.services.common.bus import JetStreamSettings, ensure_bucket, ensure_event_stream
from herder.services.common.credentials import ServiceCredential
from herder.services.common.events import EventPublisher
from herder.services.common.natsserver import EmbeddedNats
from herder.services.common.runtime import RequestContext, Runtime, Service, ServiceRunner, endpoint
from herder.services.common.tokens import TokenResolver, new_secret, token_hash

TARGET_P50_RATIO = 1.5
# The fence's ceiling on what it may add to herder's p50.
FENCE_P50_BUDGET = 0.05
# Where a client of the default tenant may send requests: the raw responders live there too.
RAW_SUBJECT = "hd.default.svc.bench.raw"
CPU_SUBJECT = "hd.default.svc.bench.cpu"  # the responder process answers with its CPU time
READY = "bench-responders-ready"
CHILD_START_TIMEOUT_S = 30.0
SERVE_FLAG = "--serve"  # hidden: runs the responders, in the child process
SCRIPT = Path(__file__).resolve()

DEFAULT_REQUESTS = 5000
DEFAULT_CONCURRENT_REQUESTS = 20000
DEFAULT_CONCURRENCY = 32
DEFAULT_WARMUP = 500
DEFAULT_ROUNDS = 4


# --- the no-op service (module level: endpoint annotations are resolved with get_type_hints) ---


class NoopReply(Model):
    """Echoes the request."""

    n: int
    text: str


class NoopRequest(Request[NoopReply]):
    """A request that does nothing; about 100 bytes of msgpack."""

    service = "bench"
    verb = "noop"

    n: int
    text: str


class BenchService(Service):
    """The benchmark's no-op service."""

    name = "bench"

    @endpoint()
    async def noop(self, request: NoopRequest, ctx: RequestContext) -> NoopReply:
        """Answer with what was sent."""
        return NoopReply(n=request.n, text=request.text)


def bench_request() -> NoopRequest:
    """The one request every caller sends, herder or raw."""
    return NoopRequest(n=123_456, text="The quick brown fox jumps over the lazy dog; " * 2)


# --- the child: both responders on one connection ---


async def serve(url: str, credential_file: str) -> None:
    """Run the herder service, the raw responder and the auth callout until stdin closes."""
    credential = ServiceCredential.read(Path(credential_file))
    nc = await connect(url, name="bench-responders", credentials=credential.service)
    js = nc.jetstream()
    tokens = TokenResolver(await ensure_bucket(js, subjects.TOKENS_BUCKET, JetStreamSettings()))
    await tokens.start()
    callout = Callout(nc, tokens, credential, structlog.get_logger("bench"))
    await callout.start()
    runtime = Runtime(nc=nc, js=js, engine=None, tokens=tokens, events=EventPublisher(js, None))
    runner = ServiceRunner(BenchService(runtime))
    await runner.start()

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    async def cpu_time(msg: Any) -> None:
        await msg.respond(str(time.process_time()).encode())

    raw = await nc.subscribe(RAW_SUBJECT, cb=echo)
    await nc.subscribe(CPU_SUBJECT, cb=cpu_time)
    await sync(nc)
    print(READY, flush=True)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    await raw.unsubscribe()
    await callout.stop()
    await runner.stop(timeout=2.0)
    await tokens.stop()
    await nc.drain()


# --- the parent: callers and figures ---


@dataclass
class Figures:
    """The measured figures of one side in one scenario."""

    requests: int
    p50_us: float
    p99_us: float
    mean_us: float
    requests_per_s: float
    caller_cpu_us: float
    responder_cpu_us: float


@dataclass
class Comparison:
    """herder against raw in one scenario."""

    callers: int
    herder: Figures
    raw: Figures
    p50_ratio: float
    p99_ratio: float
    throughput_ratio: float
    target_met: bool


def figures(latencies_ns: list[int], elapsed_s: float, caller_cpu_s: float, responder_cpu_s: float) -> Figures:
    ordered = sorted(latencies_ns)
    return Figures(
        requests=len(ordered),
        p50_us=percentile(ordered, 0.50) / 1000,
        p99_us=percentile(ordered, 0.99) / 1000,
        mean_us=sum(ordered) / len(ordered) / 1000,
        requests_per_s=len(ordered) / elapsed_s if elapsed_s > 0 else 0.0,
        caller_cpu_us=caller_cpu_s / len(ordered) * 1e6,
        responder_cpu_us=responder_cpu_s / len(ordered) * 1e6,
    )


Call = Callable[[], Awaitable[object]]


async def run_callers(call: Call, requests: int, callers: int) -> tuple[list[int], float]:
    """Send `requests` requests from `callers` concurrent callers; per-request latencies and wall time."""
    latencies: list[int] = []
    remaining = requests
    clock = time.perf_counter_ns

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = clock()
            await call()
            latencies.append(clock() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, time.perf_counter() - started


async def scenario(
    calls: dict[str, Call],
    responder_cpu: Callable[[], Awaitable[float]],
    requests: int,
    callers: int,
    warmup: int,
    rounds: int,
) -> Comparison:
    """Warm both sides up, then measure `requests` per side, split into alternating rounds.

    Besides latency, each round records the CPU time the caller and the responder process spent.
    """
    for call in calls.values():
        await run_callers(call, warmup, callers)
    latencies: dict[str, list[int]] = {side: [] for side in calls}
    elapsed: dict[str, float] = dict.fromkeys(calls, 0.0)
    caller_cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
    served_cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
    rounds = min(rounds, requests)
    order = list(calls)
    for round_number in range(rounds):
        size = requests // rounds + (1 if round_number < requests % rounds else 0)
        for side in order if round_number % 2 == 0 else reversed(order):
            served_before, caller_before = await responder_cpu(), time.process_time()
            measured, seconds = await run_callers(calls[side], size, callers)
            caller_cpu[side] += time.process_time() - caller_before
            served_cpu[side] += await responder_cpu() - served_before
            latencies[side] += measured
            elapsed[side] += seconds
    herder, raw = (
        figures(latencies[side], elapsed[side], caller_cpu[side], served_cpu[side]) for side in ("herder", "raw")
    )
    p50_ratio = herder.p50_us / raw.p50_us
    return Comparison(
        callers=callers,
        herder=herder,
        raw=raw,
        p50_ratio=p50_ratio,
        p99_ratio=herder.p99_us / raw.p99_us,
        throughput_ratio=herder.requests_per_s / raw.requests_per_s,
        target_met=p50_ratio <= TARGET_P50_RATIO,
    )


async def start_child(url: str, credential_file: Path) -> asyncio.subprocess.Process:
    """Start the responders in a child process running this script, and wait until they serve."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        SERVE_FLAG,
        url,
        str(credential_file),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(child.stdout.readline(), CHILD_START_TIMEOUT_S)
            if not line:
                raise RuntimeError(f"the responder process exited at start (code {await child.wait()})")
            if line.decode().strip() == READY:
                return child
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        raise


async def stop_child(child: asyncio.subprocess.Process) -> None:
    if child.stdin is not None:
        child.stdin.close()
    try:
        await asyncio.wait_for(child.wait(), 10.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


async def measure(url: str, credential_file: Path, args: argparse.Namespace) -> dict[str, Comparison]:
    credential = ServiceCredential.read(credential_file)
    setup = await connect(url, name="bench-setup", credentials=credential.service)
    try:
        js = setup.jetstream()
        await ensure_event_stream(js, subjects.DEFAULT_TENANT, JetStreamSettings())
        kv = await ensure_bucket(js, subjects.TOKENS_BUCKET, JetStreamSettings())
        secret = new_secret()
        principal = Principal(
            kind=PrincipalKind.TOKEN,
            name="bench",
            tenant=subjects.DEFAULT_TENANT,
            role=Role.ADMIN,
            permissions=frozenset({"*"}),
        )
        await kv.put(token_hash(secret), codec.dump(principal))
    finally:
        await setup.drain()
    child = await start_child(url, credential_file)
    try:
        # The caller is a client: admitted by the callout, fenced by the server.
        nc = await connect(url, name="bench-callers", credentials=Credentials(token=secret))
        try:
            client = Client(nc, token=secret)
            request = bench_request()
            payload = codec.dump(request)

            async def herder_call() -> object:
                return await client.request(request)

            async def raw_call() -> object:
                return await nc.request(RAW_SUBJECT, payload, timeout=5.0)

            # Both sides answer, and answer the same thing, before anything is timed.
            reply = await client.request(request)
            raw_reply = await nc.request(RAW_SUBJECT, payload, timeout=5.0)
            assert reply == NoopReply(n=request.n, text=request.text), reply
            assert raw_reply.data == payload

            async def responder_cpu() -> float:
                return float((await nc.request(CPU_SUBJECT, b"", timeout=5.0)).data)

            calls: dict[str, Call] = {"herder": herder_call, "raw": raw_call}
            results = {
                "sequential": await scenario(calls, responder_cpu, args.requests, 1, args.warmup, args.rounds),
                "concurrent": await scenario(
                    calls, responder_cpu, args.concurrent_requests, args.concurrency, args.warmup, args.rounds
                ),
            }
        finally:
            await nc.drain()
    finally:
        await stop_child(child)
    return results


def render(results: dict[str, Comparison], args: argparse.Namespace, env: dict[str, Any], payload: int) -> str:
    lines = [
        "RPC round trip: herder runtime vs raw nats-py request/reply, through the fence",
        f"  payload {payload} B msgpack; responders in a child process; warmup {args.warmup}/side; "
        f"{args.rounds} alternating rounds",
        f"  Python {env['python']}, nats-py {env['nats_py']}, {env['nats_server']}, {env['cpus']} CPUs",
        "",
        f"  {'scenario':<16} {'side':<7} {'requests':>8} {'p50 µs':>9} {'p99 µs':>9} {'req/s':>9}"
        f" {'caller CPU µs':>14} {'responder CPU µs':>17}",
    ]
    for name, result in results.items():
        label = f"{name} ({result.callers})"
        for side, fig in (("herder", result.herder), ("raw", result.raw)):
            lines.append(
                f"  {label:<16} {side:<7} {fig.requests:>8} {fig.p50_us:>9.0f} {fig.p99_us:>9.0f} "
                f"{fig.requests_per_s:>9.0f} {fig.caller_cpu_us:>14.0f} {fig.responder_cpu_us:>17.0f}"
            )
            label = ""
        lines.append(
            f"  {'':<16} {'ratio':<7} {'':>8} {result.p50_ratio:>8.2f}x {result.p99_ratio:>8.2f}x "
            f"{result.throughput_ratio:>8.2f}x"
        )
    lines.append("")
    for name, result in results.items():
        verdict = "met" if result.target_met else "NOT met"
        lines.append(f"  target herder p50 <= {TARGET_P50_RATIO}x raw, {name}: {verdict} ({result.p50_ratio:.2f}x)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--requests", type=int, default=DEFAULT_REQUESTS, help="requests per side, single caller (%(default)s)"
    )
    parser.add_argument(
        "--concurrent-requests",
        type=int,
        default=DEFAULT_CONCURRENT_REQUESTS,
        help="requests per side, concurrent callers (%(default)s)",
    )
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="concurrent callers (%(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed requests per side first (%(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="alternating herder/raw rounds (%(default)s)"
    )
    args = parser.parse_args(argv)
    for option in ("requests", "concurrent_requests", "concurrency", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def fence_cost(fenced: dict[str, Comparison], plain: dict[str, Comparison]) -> dict[str, dict[str, float]]:
    """What the fence adds to herder's p50 in each scenario: both p50s and the relative change."""
    return {
        name: {
            "fenced_p50_us": fenced[name].herder.p50_us,
            "plain_p50_us": plain[name].herder.p50_us,
            "change": fenced[name].herder.p50_us / plain[name].herder.p50_us - 1,
        }
        for name in fenced
    }


def render_cost(cost: dict[str, dict[str, float]]) -> str:
    lines = ["", "The fence's cost: herder's p50 on a fenced server against a plain one, same run"]
    for name, figures_ in cost.items():
        verdict = "within" if figures_["change"] <= FENCE_P50_BUDGET else "OVER"
        lines.append(
            f"  {name:<12} fenced {figures_['fenced_p50_us']:>6.0f} µs   plain {figures_['plain_p50_us']:>6.0f} µs   "
            f"{figures_['change']:+.1%} ({verdict} the {FENCE_P50_BUDGET:.0%} budget)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logs.configure(level="warning")
    if argv[:1] == [SERVE_FLAG]:
        asyncio.run(serve(argv[1], argv[2]))
        return 0
    args = parse_args(argv)
    runs: dict[str, dict[str, Comparison]] = {}
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as store:
        credential_file = Path(store) / "service-credential.json"
        credential = ServiceCredential.generate()
        credential.write(credential_file)
        for name, fence in (("fenced", credential), ("plain", None)):
            server = EmbeddedNats(Path(store) / name, credential=fence)
            url = server.start()
            try:
                runs[name] = asyncio.run(measure(url, credential_file, args))
            finally:
                server.stop()
    results = runs["fenced"]
    cost = fence_cost(results, runs["plain"])
    env = environment()
    payload = len(codec.dump(bench_request()))
    if args.json:
        document = {
            "benchmark": "rpc_round_trip",
            "target_p50_ratio": TARGET_P50_RATIO,
            "target_met": all(result.target_met for result in results.values()),
            "fence_p50_budget": FENCE_P50_BUDGET,
            "fence_cost": cost,
            "payload_bytes": payload,
            "config": {
                "requests": args.requests,
                "concurrent_requests": args.concurrent_requests,
                "concurrency": args.concurrency,
                "warmup": args.warmup,
                "rounds": args.rounds,
            },
            "environment": env,
            "results": {name: asdict(result) for name, result in results.items()},
            "plain_results": {name: asdict(result) for name, result in runs["plain"].items()},
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(results, args, env, payload) + render_cost(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
