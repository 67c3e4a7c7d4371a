"""`herder token create|list|revoke` and `herder whoami`."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from herder.cli.context import (
    ENV_BUNDLE,
    BundleOption,
    DataDirOption,
    JsonOption,
    TokenFileOption,
    UrlOption,
    call,
    resolve,
)
from herder.cli.output import Column, WideOption, check_new_file, print_json, print_table, when
from herder.client.bundle import Bundle, write_bundle
from herder.protocol.auth import Principal, Role, TokenCreate, TokenListRequest, TokenRevoke, WhoAmI
from herder.protocol.fence import inbox_prefix

token_app = typer.Typer(help="API tokens for integrators and operators.", no_args_is_help=True)


class ApiRole(StrEnum):
    """The roles an API token may have (robot tokens come from 'herder robot add')."""

    ADMIN = Role.ADMIN.value
    OPERATOR = Role.OPERATOR.value
    INTEGRATOR = Role.INTEGRATOR.value


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A short name: lower-case letters, digits, '.', '_' or '-'.")],
    role: Annotated[ApiRole, typer.Option("--role", help="What the token may do.")] = ApiRole.OPERATOR,
    bundle_out: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            help="Write a connection bundle (the stack's URLs, its CA and this token) to this new file (mode "
            "0600) instead of printing the secret: what an integrator's machine needs, in one file.",
        ),
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create an API token. Its secret is printed once, now (or put in a bundle); herder keeps only a hash."""
    request = TokenCreate(name=name, role=Role(role.value))
    env_bundle = os.environ.get(ENV_BUNDLE)
    target = resolve(data_dir, url, token_file, Path(env_bundle) if env_bundle else None)
    if bundle_out is not None:
        check_new_file(bundle_out, "the bundle")
    created = call(target, lambda c: c.request(request))
    if bundle_out is not None:
        urls = list(target.advertised_urls or (target.nats_url,))
        write_bundle(
            bundle_out, Bundle(urls=urls, ca_pem=target.ca_pem, token=created.secret, tenant=target.tenant, robot=None)
        )
        if json_out:
            print_json(created.token)
        else:
            print(f"created token {created.token.name} ({created.token.role.value}); its bundle is in {bundle_out}")
        return
    if json_out:
        print_json(created)
        return
    print(
        f"created token {created.token.name} ({created.token.role.value}); its secret, shown this once:",
        file=sys.stderr,
    )
    print(created.secret)


# `token list` on a narrow terminal: CREATED goes first, then BY; NAME, ROLE and STATE are always whole.
TOKEN_COLUMNS = (
    Column("NAME"),
    Column("ROLE"),
    Column("CREATED (UTC)", drop=1),
    Column("BY", drop=2),
    Column("STATE"),
)


@token_app.command("list")
def list_tokens(
    all_tokens: Annotated[bool, typer.Option("--all", help="Include revoked tokens.")] = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the API tokens (never their secrets)."""
    listed = call(
        resolve(data_dir, url, token_file, bundle), lambda c: c.request(TokenListRequest(include_revoked=all_tokens))
    )
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
    print_table(TOKEN_COLUMNS, rows, wide=wide)


@token_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The token to revoke.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke an API token; every service refuses it from then on."""
    revoked = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(TokenRevoke(name=name)))
    if json_out:
        print_json(revoked.token)
    else:
        print(f"revoked token {revoked.token.name}")


def whoami(
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show who the token you use stands for."""
    target = resolve(data_dir, url, token_file, bundle)
    principal: Principal = call(target, lambda c: c.request(WhoAmI()))
    # The one inbox nats-server lets this token's connections listen on: other programs need it.
    inbox = inbox_prefix(target.token) if target.token else None
    if json_out:
        print_json({**principal.model_dump(mode="json"), "inbox_prefix": inbox})
        return
    permissions = ", ".join(sorted(principal.permissions)) or "none beyond its role"
    print(f"{principal.name} ({principal.kind.value}, role {principal.role.value}) in tenant {principal.tenant}")
    print(f"permissions: {permissions}")
    if inbox is not None:
        print(f"inbox prefix: {inbox} (a NATS client using this token must set it)")
