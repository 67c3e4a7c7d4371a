"""The `herder` command: one entry point, a sub-command per job."""

from __future__ import annotations

import sys

import typer

from herder.cli import fence, jobs, packages, queues, robots, secrets, stack, status, storage, tap, tokens, triggers
from herder.cli.output import asks_for_json, refuse_tokens_in_arguments, report_errors

app = typer.Typer(
    name="herder",
    help="herder orchestrates RPA robots. Start a stack with 'herder up', then look at it with 'herder status'.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("up")(stack.up)
app.command("status")(status.status)
app.command("version")(status.version)
app.command("tap")(tap.tap)
app.command("whoami")(tokens.whoami)
app.add_typer(tokens.token_app, name="token")
app.add_typer(stack.db_app, name="db")
app.add_typer(robots.robot_app, name="robot")
app.add_typer(packages.package_app, name="package")
app.add_typer(jobs.job_app, name="job")
app.add_typer(queues.queue_app, name="queue")
app.add_typer(triggers.trigger_app, name="trigger")
app.add_typer(secrets.asset_app, name="asset")
app.add_typer(secrets.credential_app, name="credential")
app.add_typer(storage.storage_app, name="storage")
app.add_typer(secrets.secrets_app, name="secrets")
app.add_typer(fence.fence_app, name="fence")

service_app = typer.Typer(help="Run herder services on their own (the way to scale out).", no_args_is_help=True)
service_app.command("run")(stack.service_run)
app.add_typer(service_app, name="service")


def main() -> None:
    """Entry point of the `herder` script."""
    args = sys.argv[1:]
    # A program that asked for JSON gets its errors as JSON too, whatever stage fails.
    with report_errors(json_errors=asks_for_json(args)):
        refuse_tokens_in_arguments(args)
        # Not standalone: usage errors reach report_errors, which says them in one line.
        status = app(standalone_mode=False)
    if isinstance(status, int) and status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
