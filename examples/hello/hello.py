"""Greets whoever the job's input names: {"name": "Ada"} gives the output {"greeting": "Hello, Ada!"}."""

from typing import Any

from herder.robot import sdk


def main(job: dict[str, Any]) -> dict[str, Any]:
    """Say hello to the input's `name` ("world" when there is none); the returned dict is the job's output."""
    name = job.get("name", "world")
    sdk.log.info("hello.greeting", name=name)
    print(f"Hello, {name}!")  # printed lines land in the job's log too
    return {"greeting": f"Hello, {name}!"}


if __name__ == "__main__":  # without herder: python hello.py
    print(main(sdk.job_input()))
