"""A command that joined a process group leaves through distributed.shutdown: output flushed, the
group destroyed, and os._exit (no interpreter teardown, where 2-rank gloo jobs abort in about one
run in three with "terminate called without an active exception")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import argparse, atexit, sys
    import os
    from argonne_ds import cli
    from argonne_ds.engine import distributed

    atexit.register(lambda: print("interpreter teardown ran", flush=True))

    def command(args):
        distributed.init_distributed(timeout_s=30)  # no launcher: one rank on a free port
        print(f"command ran on port {os.environ['MASTER_PORT']}")  # not flushed here
        if args.fail:
            raise RuntimeError("boom")
        return 5

    def parser():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="command", required=True)
        c = sub.add_parser("job")
        c.add_argument("--fail", action="store_true")
        c.set_defaults(func=command)
        return p

    cli.build_parser = parser
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("fail", [False, True])
def test_distributed_command_exits_through_shutdown(fail: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "job", *(["--fail"] if fail else [])],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "command ran on port" in proc.stdout, proc.stderr
    assert "29500" not in proc.stdout  # a free port, so two single-process jobs can coexist
    assert "interpreter teardown ran" not in proc.stdout  # left through os._exit
    if fail:
        assert proc.returncode == 1
        assert "RuntimeError: boom" in proc.stderr  # the traceback still reaches the user
    else:
        assert proc.returncode == 5, proc.stderr
