"""`herder asset set|get|list|delete` and `herder credential set|list|get|delete`.

Assets are a fleet's shared settings (a URL, a threshold, a flag, a calendar of non-working days);
credentials are the logins robots use. A value may be global, for a robot group, or for one robot;
a robot reads the most specific. A credential's secret is never taken on the command line: `set`
asks at a hidden prompt (or reads stdin), and it travels sealed to the secrets service; `get
--reveal` needs the right to see secrets, and the secret comes back sealed to this command.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    TokenFileOption,
    UrlOption,
    call,
    default_data_dir,
    resolve,
)
from herder.cli.output import EXIT_USAGE, Column, WideOption, fail, print_json, print_table
from herder.client import secrets as credentials
from herder.client.errors import SetupError
from herder.protocol.secrets import (
    AssetDelete,
    AssetGet,
    AssetInfo,
    AssetListRequest,
    AssetSet,
    AssetType,
    CredentialDelete,
    CredentialInfo,
    CredentialListRequest,
    RewrapReport,
    Scope,
    SecretsRewrap,
)
from herder.protocol.values import parse_json_object

asset_app = typer.Typer(
    help="Assets: shared values robots read (text, bool, integer, JSON, calendar), global, per group or per robot.",
    no_args_is_help=True,
)
credential_app = typer.Typer(
    help="Credentials: usernames and secrets robots log in with, encrypted at rest and sealed in transit.",
    no_args_is_help=True,
)

RobotOption = Annotated[str | None, typer.Option("--robot", help="The value for this robot only.")]
GroupOption = Annotated[str | None, typer.Option("--group", help="The value for this robot group.")]

ASSET_COLUMNS = (Column("NAME"), Column("TYPE"), Column("SCOPE"), Column("VALUE", cut=True, min_width=16))
CREDENTIAL_COLUMNS = (
    Column("NAME"),
    Column("SCOPE"),
    Column("USERNAME", cut=True, min_width=12),
    Column("EXPIRES", drop=1),
    Column("STATE"),
)


def _scope(robot: str | None, group: str | None) -> Scope:
    if robot is not None and group is not None:
        fail("give --robot or --group, not both: a value is for one robot, one group, or everyone", EXIT_USAGE)
    try:
        return Scope.of(robot=robot, group=group)
    except ValueError as exc:
        fail(f"--robot/--group: {exc}", EXIT_USAGE)


def parse_value(text: str, kind: AssetType) -> Any:
    """A value typed on the command line, as its asset type reads it (the service checks it again)."""
    if kind is AssetType.TEXT:
        return text
    if kind is AssetType.BOOL:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        fail(f"VALUE: {text!r} is not a bool; give true or false", EXIT_USAGE)
    if kind is AssetType.INTEGER:
        try:
            return int(text.strip())
        except ValueError:
            fail(f"VALUE: {text!r} is not an integer", EXIT_USAGE)
    if kind is AssetType.CALENDAR:
        days = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
        for day in days:
            try:
                date.fromisoformat(day)
            except ValueError:
                fail(f"VALUE: {day!r} is not a date as YYYY-MM-DD; give the non-working days separated by commas")
        return days
    try:
        wrapped = parse_json_object('{"v": ' + text + "}", what="VALUE")
    except ValueError as exc:
        fail(f"VALUE: not JSON ({exc})", EXIT_USAGE)
    return wrapped["v"]


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@asset_app.command("set")
def asset_set(
    name: Annotated[str, typer.Argument(help="The asset's name.")],
    value: Annotated[str, typer.Argument(help="Its value; for a calendar, dates (YYYY-MM-DD) separated by commas.")],
    kind: Annotated[
        AssetType | None, typer.Option("--type", help="The asset's type; needed when it is created.")
    ] = None,
    robot: RobotOption = None,
    group: GroupOption = None,
    description: Annotated[str | None, typer.Option("--description", help="What it is for.")] = None,
    robots_may_write: Annotated[
        bool | None, typer.Option("--robots-may-write/--read-only", help="Whether robots may write it.")
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Set an asset's value, globally or for a group or a robot; the first set creates it with --type."""
    scope = _scope(robot, group)
    target = resolve(data_dir, url, token_file, bundle)
    known_type = kind
    if known_type is None:
        known_type = _existing_type(target, name)
    request = AssetSet(
        name=name,
        type=kind,
        value=parse_value(value, known_type),
        scope=scope,
        description=description,
        robots_may_write=robots_may_write,
    )
    info = call(target, lambda c: c.request(request))
    if json_out:
        print_json(info)
        return
    print(f"asset {info.name} ({info.type.value}) set, {scope.describe()}")


def _existing_type(target: Any, name: str) -> AssetType:
    listed = call(target, lambda c: c.request(AssetListRequest()))
    for asset in listed.assets:
        if asset.name == name:
            return asset.type
    fail(f"asset {name!r} does not exist yet: give --type (text, bool, integer, json or calendar) to create it")


@asset_app.command("get")
def asset_get(
    name: Annotated[str, typer.Argument(help="The asset's name.")],
    robot: Annotated[str | None, typer.Option("--robot", help="The value this robot reads.")] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """The value a robot reads (its own, then its groups', then the global one), and which scope won."""
    resolved = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(AssetGet(name=name, robot=robot)))
    if json_out:
        print_json(resolved)
        return
    print(_shown(resolved.value))
    print(f"({resolved.type.value}, {resolved.scope.describe()} value)", file=sys.stderr)


@asset_app.command("list")
def asset_list(
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Every asset with each of its values."""
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(AssetListRequest()))
    if json_out:
        print_json(listed.assets)
        return
    if not listed.assets:
        print("no assets yet; set one with 'herder asset set NAME VALUE --type text'", file=sys.stderr)
        return
    print_table(ASSET_COLUMNS, [row for asset in listed.assets for row in _asset_rows(asset)], wide=wide)


def _asset_rows(asset: AssetInfo) -> list[list[str]]:
    return [[asset.name, asset.type.value, value.scope.describe(), _shown(value.value)] for value in asset.values] or [
        [asset.name, asset.type.value, "-", "(no value)"]
    ]


@asset_app.command("delete")
def asset_delete(
    name: Annotated[str, typer.Argument(help="The asset's name.")],
    robot: RobotOption = None,
    group: GroupOption = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete the value for a robot or a group; without either, the whole asset."""
    scope = _scope(robot, group) if robot or group else None
    info = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(AssetDelete(name=name, scope=scope)))
    if json_out:
        print_json(info)
        return
    print(f"asset {name}: {'deleted' if scope is None else scope.describe() + ' value deleted'}")


# --- credentials ---


def read_secret(prompt: str) -> str:
    """The secret from a hidden prompt on a terminal, or the first line of stdin otherwise."""
    if sys.stdin.isatty():
        secret = getpass.getpass(prompt)
        if secret and getpass.getpass("again: ") != secret:
            fail("the two entries differ; nothing was set", EXIT_USAGE)
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        fail("the secret is empty; type it at the prompt, or send it on stdin", EXIT_USAGE)
    return secret


@credential_app.command("set")
def credential_set(
    name: Annotated[str, typer.Argument(help="The credential's name.")],
    username: Annotated[str, typer.Option("--username", help="The login's user name.")],
    robot: RobotOption = None,
    group: GroupOption = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="When the password expires (YYYY-MM-DD); 'list' warns before.")
    ] = None,
    processes: Annotated[
        list[str] | None,
        typer.Option("--process", help="Only jobs of this process may read it (repeat for more); default: any."),
    ] = None,
    description: Annotated[str | None, typer.Option("--description", help="What it is for.")] = None,
    robots_may_write: Annotated[
        bool | None, typer.Option("--robots-may-write/--read-only", help="Whether robots may write it.")
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Set a credential; the secret is asked for at a hidden prompt (or read from stdin), never an argument."""
    scope = _scope(robot, group)
    expires_on = None
    if expires is not None:
        try:
            expires_on = date.fromisoformat(expires)
        except ValueError:
            fail(f"--expires: {expires!r} is not a date as YYYY-MM-DD", EXIT_USAGE)
    target = resolve(data_dir, url, token_file, bundle)
    secret = read_secret(f"secret for {name} ({username}): ")
    info = call(
        target,
        lambda c: credentials.set_credential(
            c,
            name,
            username,
            secret,
            scope=scope,
            expires_on=expires_on,
            description=description,
            robots_may_write=robots_may_write,
            processes=processes,
        ),
    )
    if json_out:
        print_json(info)
        return
    print(f"credential {info.name} set, {scope.describe()} (user {username})")


@credential_app.command("list")
def credential_list(
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Names, usernames, scopes and expiry (flagging expired and soon-to-expire ones); never a secret."""
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(CredentialListRequest()))
    if json_out:
        print_json(listed.credentials)
        return
    if not listed.credentials:
        print("no credentials yet; set one with 'herder credential set NAME --username USER'", file=sys.stderr)
        return
    print_table(CREDENTIAL_COLUMNS, [row for c in listed.credentials for row in _credential_rows(c)], wide=wide)


def _credential_rows(credential: CredentialInfo) -> list[list[str]]:
    rows = []
    for value in credential.values:
        state = "EXPIRED" if value.expired else "expires soon" if value.expires_soon else "ok"
        expires = value.expires_on.isoformat() if value.expires_on else "-"
        rows.append([credential.name, value.scope.describe(), value.username, expires, state])
    return rows or [[credential.name, "-", "(no value)", "-", "-"]]


@credential_app.command("get")
def credential_get(
    name: Annotated[str, typer.Argument(help="The credential's name.")],
    reveal: Annotated[bool, typer.Option("--reveal", help="Show the secret (needs the right to see secrets).")] = False,
    robot: Annotated[str | None, typer.Option("--robot", help="The value this robot reads.")] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """A credential's username and scope; its secret too with --reveal (recorded as a read)."""
    target = resolve(data_dir, url, token_file, bundle)
    if not reveal:
        listed = call(target, lambda c: c.request(CredentialListRequest()))
        found = next((c for c in listed.credentials if c.name == name), None)
        if found is None:
            fail(f"no credential {name!r}; 'herder credential list' shows them")
        if json_out:
            print_json(found)
            return
        for row in _credential_rows(found):
            print("  ".join(row))
        return
    revealed = call(target, lambda c: credentials.reveal_credential(c, name, robot=robot))
    if json_out:
        print_json(revealed)
        return
    print(f"{revealed.username} ({revealed.scope.describe()} value)", file=sys.stderr)
    print(revealed.secret)


@credential_app.command("delete")
def credential_delete(
    name: Annotated[str, typer.Argument(help="The credential's name.")],
    robot: RobotOption = None,
    group: GroupOption = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete the value for a robot or a group; without either, the whole credential."""
    scope = _scope(robot, group) if robot or group else None
    info = call(
        resolve(data_dir, url, token_file, bundle), lambda c: c.request(CredentialDelete(name=name, scope=scope))
    )
    if json_out:
        print_json(info)
        return
    print(f"credential {name}: {'deleted' if scope is None else scope.describe() + ' value deleted'}")


# --- the master key ---

secrets_app = typer.Typer(
    help="The master key that protects stored credentials: rotate it, and retire old versions.",
    no_args_is_help=True,
)


def _key_file(data_dir: Path | None) -> Path:
    from herder.services.secrets import envelope  # the local stack's key file: the services' own format

    if os.environ.get(envelope.MASTER_KEY_ENV):
        fail(
            f"the master keys come from {envelope.MASTER_KEY_ENV} here: rotate by setting it to "
            "'NEW_VERSION:NEW_KEY,OLD_VERSION:OLD_KEY' for every secrets service, restarting them, then "
            "running 'herder secrets rewrap'"
        )
    path = (data_dir or default_data_dir()) / envelope.KEY_FILE
    if not path.exists():
        fail(f"no master key file at {path}; give the stack's data folder with --data-dir")
    return path


def _report_line(report: RewrapReport) -> str:
    in_use = ", ".join(f"version {v}: {n}" for v, n in sorted(report.in_use.items())) or "none stored"
    return f"master key version {report.current_version} is current; {report.rewrapped} rewrapped; in use: {in_use}"


@secrets_app.command("rotate-key")
def rotate_key(
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a new master key version and rewrap every stored secret under it, while the service serves.

    Run it on the machine whose data folder holds master.key; the secrets services there read the new
    version within seconds. Old versions stay until 'herder secrets retire-key'."""
    from herder.services.secrets import envelope

    path = _key_file(data_dir)
    target = resolve(data_dir, url, token_file, bundle)
    try:
        version = envelope.add_version(path)
    except (OSError, ValueError, KeyError) as exc:
        fail(f"cannot add a version to {path}: {exc}")
    print(f"master key version {version} added to {path}", file=sys.stderr)
    report = call(target, lambda c: c.request(SecretsRewrap()))
    if json_out:
        print_json(report)
        return
    print(_report_line(report))
    for failure in report.failed:
        print(f"not rewrapped: {failure}", file=sys.stderr)


@secrets_app.command("rewrap")
def rewrap(
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Rewrap every stored secret under the current master key, and say which versions are in use."""
    report = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(SecretsRewrap()))
    if json_out:
        print_json(report)
        return
    print(_report_line(report))


@secrets_app.command("retire-key")
def retire_key(
    version: Annotated[int, typer.Argument(help="The master key version to remove.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
) -> None:
    """Remove an old master key version from the key file, once no stored secret needs it."""
    from herder.services.secrets import envelope

    path = _key_file(data_dir)
    try:
        current = envelope.read_key_file(path).current
    except SetupError as exc:
        fail(str(exc))
    if version == current:
        fail(f"master key version {version} is the current one; rotate first ('herder secrets rotate-key')")
    report = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(SecretsRewrap()))
    if report.in_use.get(str(version)):
        fail(f"{report.in_use[str(version)]} stored secrets still need version {version}; they did not rewrap")
    try:
        envelope.retire_version(path, version)
    except SetupError as exc:
        fail(str(exc))
    print(f"master key version {version} retired from {path}")
