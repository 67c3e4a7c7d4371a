"""The verifier station: a person approves or rejects the invoices the `invoices` process doubted.

Run by hand on an attended robot, on the person's own terminal:

    herder robot run DESK --bundle desk.bundle --run verify

It takes the items of queue `invoices-verify` one at a time and asks: approve, reject, skip (back
to the queue, for an hour) or quit. An approved item is completed; a rejected one is failed as a
business exception, with the person's reason. Without a terminal (or for a demo or a test) the
decision comes from the input instead: {"decide": "approve"} for every item, or one per reference,
{"decide": {"INV-2": "reject", "*": "approve"}}.

Input (all optional): {"queue": "invoices-verify", "decide": …, "limit": 100}.
"""

import getpass
import json
from datetime import timedelta
from typing import Any

from herder.robot import sdk

DECISIONS = {"a": "approve", "r": "reject", "s": "skip", "q": "quit"}
SKIP_FOR = timedelta(hours=1)


class NoOneToAsk(RuntimeError):
    """There is no terminal to ask on, and the input says no decision."""


def decision_for(item: sdk.Item, decide: str | dict[str, str] | None) -> tuple[str, str]:
    """The decision on `item` and its reason: from the input when it gives one, else from the person."""
    if isinstance(decide, dict) and (item.reference in decide or "*" in decide):
        decide = decide.get(item.reference or "", decide.get("*"))
    if decide is None or isinstance(decide, dict):
        return ask(item)
    if decide not in DECISIONS.values():
        raise ValueError(f"decide: {decide!r} is not one of {', '.join(DECISIONS.values())}")
    return decide, "decided by the job's input"


def ask(item: sdk.Item) -> tuple[str, str]:
    """Show the item to the person and read their decision (and, for a rejection, why)."""
    invoice = item.content.get("invoice", item.content)
    print(f"\nInvoice {item.reference or item.id} (attempt {item.attempt}):")
    print(json.dumps(invoice, indent=2, ensure_ascii=False))
    print(f"Doubtful because: {item.content.get('doubt', '?')}")
    try:
        while True:
            answer = input("[a]pprove, [r]eject, [s]kip for an hour, [q]uit? ").strip().lower()[:1]
            if answer in DECISIONS:
                break
            print("Type a, r, s or q.")
        reason = input("Why? ").strip() if answer == "r" else ""
    except EOFError:
        raise NoOneToAsk(
            "no terminal to ask on: run this with 'herder robot run ROBOT --run verify' in a terminal, or give "
            'a decision as input, like {"decide": "approve"}'
        ) from None
    return DECISIONS[answer], reason


def main(job: dict[str, Any]) -> dict[str, Any]:
    """Decide items until the queue is empty, the person quits, or `limit` items; the counts are the output."""
    queue = sdk.queue(job.get("queue", "invoices-verify"))
    decide = job.get("decide")
    limit = int(job.get("limit", 1_000_000))
    who = getpass.getuser()
    counts = {"approved": 0, "rejected": 0, "skipped": 0}
    while sum(counts.values()) < limit:
        item = queue.next()
        if item is None:
            print("Nothing left to verify.")
            break
        try:
            decision, reason = decision_for(item, decide)
        except BaseException:
            # Nobody decided: the item goes back to the queue for the next person, not to waste.
            item.postpone(timedelta(seconds=1), reason="the verifier stopped before deciding")
            raise
        if decision == "approve":
            item.complete({"decision": "approved", "by": who})
            counts["approved"] += 1
        elif decision == "reject":
            item.fail(reason or "rejected by the verifier", kind="business")
            counts["rejected"] += 1
        elif decision == "skip":
            item.postpone(SKIP_FOR, reason=f"skipped by {who}")
            counts["skipped"] += 1
        else:  # quit
            item.postpone(timedelta(seconds=1), reason=f"{who} stopped verifying")
            break
        sdk.log.info("verify.decided", item=item.id, reference=item.reference, decision=decision)
    return counts
