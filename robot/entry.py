"""Runs a package's Python entry point for the robot: `python -m herder.robot.entry module:function [args…]`.

The robot starts this in the package folder (which is first on PYTHONPATH). It imports the
module, calls the function with the job's input if it takes a positional parameter (with nothing
otherwise; a coroutine function is run to completion), and makes a returned dict the job's output.

Any failure — the module does not import, the function is missing, the function raises — is
written as one line, `<ExceptionType>: <message>`, to the file HERDER_JOB_ERROR_FILE names (the
job's error), the traceback goes to stderr (the job's log), and the exit code is 1. An interrupt
(SIGINT: Ctrl-C on a run by hand) the script lets through ends it by that signal, saying in one
line where it was rather than with a traceback: it was asked for, it is no failure of the script's.

Only the standard library and the SDK are imported, so a job starts in the time Python does.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

from herder.robot import sdk

EXIT_FAILED = 1


class EntryFailed(Exception):
    """The entry point could not be run; the message is the job's error."""


def main(argv: list[str] | None = None) -> int:
    """Run the entry point named by `argv[0]` (`module:function`), passing the rest on in `sys.argv`."""
    words = sys.argv[1:] if argv is None else argv
    if not words:
        return _fail("usage: python -m herder.robot.entry module:function [args…]")
    target, *args = words
    # The function sees its arguments as a script would.
    sys.argv = [target, *args]
    try:
        function = load(target)
    except EntryFailed as exc:
        return _fail(str(exc), exc.__cause__)
    except KeyboardInterrupt as interrupt:
        _end_interrupted(interrupt)
    try:
        result = call(function)
        if isinstance(result, dict):
            sdk.set_output(result)
    except Exception as exc:
        return _fail(summary(exc), exc)
    except KeyboardInterrupt as interrupt:
        _end_interrupted(interrupt)
    if result is not None and not isinstance(result, dict):
        sdk.log.warning("entry.result_ignored", type=type(result).__name__, reason="only a dict becomes the output")
    return 0


def load(target: str) -> Callable[..., Any]:
    """The callable `module:function` names (`function` may be dotted, e.g. `Robot.run`); `EntryFailed` if none."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise EntryFailed(f"entry point {target!r} must be written module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself is missing: its traceback would only show herder's and importlib's frames.
        cause = None if exc.name == module_name else exc
        raise EntryFailed(f"cannot import module {module_name!r}: {summary(exc)}") from cause
    except Exception as exc:
        raise EntryFailed(f"cannot import module {module_name!r}: {summary(exc)}") from exc
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise EntryFailed(f"module {module_name!r} has no function {attribute!r}") from None
    if not callable(found):
        raise EntryFailed(f"{target!r} is a {type(found).__name__}, not a function")
    return found  # type: ignore[no-any-return]


def call(function: Callable[..., Any]) -> Any:
    """Call `function` with the job's input if it accepts one positional argument, else with none."""
    try:
        signature = inspect.signature(function)
        signature.bind(None)
        takes_input = True
    except TypeError:
        takes_input = False
    except ValueError:
        takes_input = False  # a builtin without a signature: call it plainly
    result = function(sdk.job_input()) if takes_input else function()
    if inspect.iscoroutine(result):
        import asyncio  # only async entry points pay for it

        result = asyncio.run(result)
    return result


def summary(exc: BaseException) -> str:
    """`<ExceptionType>: <message>`, or the type alone when the message is empty."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _fail(error: str, exc: BaseException | None = None) -> int:
    """Report `error` as the job's error (with the traceback of `exc` on stderr); the exit code."""
    if exc is None:
        print(error, file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, _script_frames(exc.__traceback__))
    path = os.environ.get(sdk.ENV_ERROR_FILE)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(error + "\n")
    sys.stderr.flush()
    return EXIT_FAILED


def _end_interrupted(interrupt: KeyboardInterrupt) -> NoReturn:
    """End by SIGINT, as the interrupt asked: the robot sees how the run ended; stderr says where, in one line."""
    frames = traceback.extract_tb(_script_frames(interrupt.__traceback__))
    where = f" in {frames[-1].name} ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    print(f"interrupted{where}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(128 + signal.SIGINT)  # only where a signal cannot end the process


def _script_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the script's first frame on: herder's and importlib's frames say nothing."""
    while tb is not None and _hidden(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _hidden(filename: str) -> bool:
    return filename in (__file__, sdk.__file__, importlib.__file__) or filename.startswith("<frozen importlib")


if __name__ == "__main__":
    sys.exit(main())
