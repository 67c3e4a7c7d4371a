"""`herder token create|list|revoke` and `herder whoami`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from herder.cli.context import DataDirOption, JsonOption, TokenFileOption, UrlOption, call, resolve
from herder.cli.output import print_json, print_table, when
from herder.protocol.auth import Principal, Role, TokenCreate, TokenListRequest, TokenRevoke, WhoAmI

token_app = typer.Typer(help="API tokens for integrators and operators.", no_args_is_help=True)


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A short name: lower-case letters, digits, '.', '_' or '-'.")],
    role: Annotated[Role, typer.Option("--role", help="What the token may do.")] = Role.OPERATOR,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create an API token. Its secret is printed once, now; herder keeps only a hash."""
    created = call(resolve(data_dir, url, token_file), lambda c: c.request(TokenCreate(name=name, role=role)))
    if json_out:
        print_json(created)
        return
    print(
        f"created token {created.token.name} ({created.token.role.value}); its secret, shown this once:",
        file=sys.stderr,
    )
    print(created.secret)


@token_app.command("list")
def list_tokens(
    all_tokens: Annotated[bool, typer.Option("--all", help="Include revoked tokens.")] = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the API tokens (never their secrets)."""
    listed = call(resolve(data_dir, url, token_file), lambda c: c.request(TokenListRequest(include_revoked=all_tokens)))
    if json_out:
        print_json(listed.tokens)
        return
    rows = [
        (
            t.name,
            t.role.value,
            when(t.created_at),
            t.created_by,
            when(t.revoked_at) if t.revoked_at else "live",
        )
        for t in listed.tokens
    ]
    print_table(["NAME", "ROLE", "CREATED (UTC)", "BY", "STATE"], rows)


@token_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The token to revoke.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke an API token; every service refuses it from then on."""
    revoked = call(resolve(data_dir, url, token_file), lambda c: c.request(TokenRevoke(name=name)))
    if json_out:
        print_json(revoked.token)
    else:
        print(f"revoked token {revoked.token.name}")


def whoami(
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show who the token you use stands for."""
    principal: Principal = call(resolve(data_dir, url, token_file), lambda c: c.request(WhoAmI()))
    if json_out:
        print_json(principal)
        return
    permissions = ", ".join(sorted(principal.permissions)) or "none beyond its role"
    print(f"{principal.name} ({principal.kind.value}, role {principal.role.value}) in tenant {principal.tenant}")
    print(f"permissions: {permissions}")
