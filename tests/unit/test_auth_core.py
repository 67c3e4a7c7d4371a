"""The auth service's pure decisions."""

from __future__ import annotations

import pytest

from herder.protocol.auth import Permission, PrincipalKind, Role
from herder.protocol.errors import Conflict
from herder.protocol.messages import utcnow
from herder.services.auth.core import BootstrapAction, TokenRecord, check_revoke, plan_bootstrap
from herder.services.common.tokens import TOKEN_PREFIX, new_secret, token_hash


def record(role: Role = Role.OPERATOR, name: str = "ci") -> TokenRecord:
    return TokenRecord(
        id="t1",
        tenant="default",
        name=name,
        role=role,
        token_hash="h" * 64,
        created_at=utcnow(),
        created_by="admin",
    )


def test_a_token_acts_with_the_permissions_of_its_role() -> None:
    admin = record(Role.ADMIN).principal()
    operator = record(Role.OPERATOR).principal()
    assert admin.kind is PrincipalKind.TOKEN
    assert admin.can(Permission.TOKENS_MANAGE)
    assert not operator.can(Permission.TOKENS_MANAGE)
    assert operator.token_id == "t1"


def test_the_listed_view_carries_no_hash() -> None:
    assert "token_hash" not in record().info().model_dump()


def test_the_last_admin_token_cannot_be_revoked() -> None:
    with pytest.raises(Conflict, match="last admin token"):
        check_revoke(record(Role.ADMIN), live_admins=1)
    check_revoke(record(Role.ADMIN), live_admins=2)
    check_revoke(record(Role.OPERATOR), live_admins=1)


@pytest.mark.parametrize(
    ("held", "admins", "rotate", "expected"),
    [
        (True, 1, False, BootstrapAction.KEEP),
        (True, 3, True, BootstrapAction.KEEP),
        (False, 0, False, BootstrapAction.CREATE),
        (False, 0, True, BootstrapAction.CREATE),
        (False, 2, True, BootstrapAction.ROTATE),
        (False, 2, False, BootstrapAction.NONE),
    ],
)
def test_bootstrap_plan(held: bool, admins: int, rotate: bool, expected: BootstrapAction) -> None:
    assert plan_bootstrap(held_token_is_admin=held, live_admins=admins, may_rotate=rotate) is expected


def test_secrets_are_long_random_and_hashed_stably() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith(TOKEN_PREFIX) and len(first) >= 40
    assert token_hash(first) == token_hash(first)
    assert len(token_hash(first)) == 64 and first not in token_hash(first)
