"""Robot Framework keywords for herder's assets and credentials: `Library    herder.robot.RobotLibrary`.

    *** Tasks ***
    Log In To The ERP
        ${login}=    Get Credential    erp
        ${url}=    Get Asset    erp-url
        Open Browser    ${url}
        Input Text        id:user    ${login.username}
        Input Password    id:pass    ${login.password}

The keywords reach herder through the robot that runs the suite, as the Python SDK does. A
credential comes back as one object whose representation hides the password, so neither the
assignment nor the arguments that carry `${login.password}` (even at `--loglevel TRACE`) write the
password to output.xml or log.html; the robot masks it in the job's log as well. Assign the password
to a variable of its own (`${pw}=    Set Variable    ${login.password}`) and Robot Framework logs
it like any other string: keep to `${login.password}`.
"""

from __future__ import annotations

from typing import Any

from herder.robot import sdk


class RobotLibrary:
    """herder's assets and credentials, as Robot Framework keywords."""

    ROBOT_LIBRARY_SCOPE = "GLOBAL"

    def get_asset(self, name: str) -> Any:
        """The value of asset `name` as this robot reads it (its own, its group's, or the global one)."""
        return sdk.asset(name)

    def set_asset(self, name: str, value: Any, own: bool = False) -> None:
        """Write asset `name` (one robots may write): its global value, or this robot's own with `own=True`."""
        sdk.set_asset(name, value, own=own)

    def get_credential(self, name: str) -> sdk.Credential:
        """Credential `name` for this job: use `${login.username}` and `${login.password}`."""
        return sdk.credential(name)

    def set_credential(self, name: str, username: str, password: str, own: bool = False) -> None:
        """Write credential `name` (one robots may write)."""
        sdk.set_credential(name, username, str(password), own=own)
