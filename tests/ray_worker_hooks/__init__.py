"""Run in each Ray worker of a test's job (runtime_env `worker_process_setup_hook`), shipped to the workers as a
py_module: at its first attempt, the unit of the module WEIGHTDIFF_TEST_STALL_UNIT, its deltas formed, writes its
worker's pid to WEIGHTDIFF_TEST_STALL_FILE and waits for the test to kill that worker; at a later attempt (the
file exists) it runs through."""

from __future__ import annotations

import os
import time


def stall_once() -> None:
    from weightdiff import actions

    module, marker = os.environ["WEIGHTDIFF_TEST_STALL_UNIT"], os.environ["WEIGHTDIFF_TEST_STALL_FILE"]
    for name, action in list(actions.ACTIONS.items()):  # the dict the executor dispatches through
        actions.ACTIONS[name] = stalled(action, module, marker)


def stalled(action, module: str, marker: str):
    def run(unit, ds, method, tensors):
        if unit.module == module and not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)  # whole, or not there: the test reads the pid once it appears
            time.sleep(300)  # killed here
        return action(unit, ds, method, tensors)

    return run
