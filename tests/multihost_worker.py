"""One process of a multi-process job, started as a cluster launcher starts each one (tests/test_multihost.py):

    python tests/multihost_worker.py SCRIPT CRASH FLAGS...

runs SCRIPT.main (sft, reward_model or rlhf_ppo) on its command-line FLAGS, as `python SCRIPT.py FLAGS` does. CRASH is
"-" or FUNCTION:N: SCRIPT.FUNCTION raises KeyboardInterrupt at its N-th call (a job killed in the middle of a step).
"""

import importlib
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    script, crash, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    module = importlib.import_module(script)
    if crash != "-":
        name, n = crash.split(":")
        real, calls = getattr(module, name), []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(n):
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        setattr(module, name, crashing)
    module.main(tyro.cli(module.Args, args=flags))
