"""The robot agent (attended and unattended), the package runner and the SDK scripts import.

`herder.robot.RobotLibrary` is the Robot Framework library of assets and credentials
(`Library    herder.robot.RobotLibrary`); it is loaded when a suite asks for it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RobotLibrary":
        from herder.robot.library import RobotLibrary

        return RobotLibrary
    raise AttributeError(f"module 'herder.robot' has no attribute {name!r}")
