"""Works through `steps` steps of `step_s` seconds each, logging its progress, and ends early on a soft stop.

Input (all optional): {"steps": 600, "step_s": 0.5, "honour_stop": true}. With "honour_stop": false it
ignores soft stops, so only a hard stop (kill) ends it before its time.
"""

import time
from typing import Any

from herder.robot import sdk


def main(job: dict[str, Any]) -> dict[str, Any]:
    """Do the steps; the output says how many were done and whether a stop cut them short."""
    steps = int(job.get("steps", 600))
    step_s = float(job.get("step_s", 0.5))
    honour_stop = bool(job.get("honour_stop", True))
    for step in range(steps):
        # Check between steps, where stopping leaves nothing half done.
        if honour_stop and sdk.should_stop():
            sdk.log.warning("long_task.stopped", done=step, steps=steps)
            return {"done": step, "stopped": True}
        sdk.log.info("long_task.step", step=step + 1, steps=steps)
        time.sleep(step_s)
    return {"done": steps, "stopped": False}


if __name__ == "__main__":  # without herder: python long_task.py
    print(main({"steps": 5, "step_s": 0.2}))
