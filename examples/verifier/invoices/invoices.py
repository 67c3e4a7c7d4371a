"""Checks the invoices of queue `invoices`, one item at a time, on an unattended robot.

A good invoice is completed. A doubtful one (a large amount, or a supplier the rules do not know)
needs a person: it is added to queue `invoices-verify`, where the `verify` process on an attended
robot shows it to someone, and its own item is completed as "sent to verification". An invoice
that cannot be read (no number, no amount) is failed as a business exception: trying it again
would not help.

An item's content: {"number": "INV-7", "supplier": "ACME", "amount": 1200.0}.
Input (all optional): {"queue": "invoices", "verify_queue": "invoices-verify", "limit": 100,
"large": 10000, "suppliers": ["ACME", "Globex"]}.
"""

from typing import Any

from herder.robot import sdk

KNOWN_SUPPLIERS = ("ACME", "Globex", "Initech")
LARGE_AMOUNT = 10_000


def check(
    content: dict[str, Any], *, large: float = LARGE_AMOUNT, suppliers: tuple[str, ...] = KNOWN_SUPPLIERS
) -> tuple[str, str]:
    """The verdict on one invoice, and why: ("good", …), ("doubtful", …) or ("unreadable", …)."""
    number = content.get("number")
    amount = content.get("amount")
    if not isinstance(number, str) or not number:
        return "unreadable", "the invoice has no number"
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
        return "unreadable", f"invoice {number} has no amount above zero"
    if amount >= large:
        return "doubtful", f"{amount:g} is {large:g} or more"
    if content.get("supplier") not in suppliers:
        return "doubtful", f"supplier {content.get('supplier')!r} is not one we know"
    return "good", "within the rules"


def main(job: dict[str, Any]) -> dict[str, Any]:
    """Check items until the queue is empty (or `limit` items, or a soft stop); the counts are the output."""
    invoices = sdk.queue(job.get("queue", "invoices"))
    to_verify = sdk.queue(job.get("verify_queue", "invoices-verify"))
    limit = int(job.get("limit", 1_000_000))
    rules = {"large": float(job.get("large", LARGE_AMOUNT)), "suppliers": tuple(job.get("suppliers", KNOWN_SUPPLIERS))}
    counts = {"good": 0, "doubtful": 0, "unreadable": 0}
    while sum(counts.values()) < limit and not sdk.should_stop():
        item = invoices.next()
        if item is None:
            break
        verdict, why = check(item.content, **rules)
        counts[verdict] += 1
        sdk.log.info("invoice.checked", item=item.id, reference=item.reference, verdict=verdict, why=why)
        if verdict == "good":
            item.complete({"verdict": "good"})
        elif verdict == "doubtful":
            # The person sees the invoice, why it is doubtful, and which item it came from.
            verify_id = to_verify.add(
                {"invoice": item.content, "doubt": why, "checked_item": item.id},
                reference=item.reference,
                priority=item.priority,
            )
            item.complete({"verdict": "sent to verification", "why": why, "verify_item": verify_id})
        else:
            item.fail(why, kind="business")
    return counts


if __name__ == "__main__":  # the rules, without herder: python invoices.py
    for sample in ({"number": "INV-1", "supplier": "ACME", "amount": 120}, {"number": "INV-2", "amount": 50_000}, {}):
        print(sample, "→", check(sample))
