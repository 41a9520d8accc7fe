"""The opt-out of job.keep_freed_memory (glibc mallopt at start-up): EXPLAIN_CLI_NO_MALLOPT=1 leaves the
allocator alone (docs/performance.md has the measured effect of either)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from explain_cli import job


@pytest.mark.parametrize("value, tuned", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_the_env_var_turns_mallopt_off(monkeypatch, value, tuned):
    calls = []

    class Libc:
        class mallopt:  # noqa: N801 - ctypes' function object: argtypes, restype, then calls
            def __new__(cls, param, value):
                calls.append((param, value))
                return 1

    monkeypatch.setattr(job, "_allocator_tuned", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36")
    monkeypatch.setenv(job.NO_MALLOPT_ENV, value)
    assert job.keep_freed_memory() is tuned
    assert len(calls) == (2 if tuned else 0)


def test_the_real_allocator_in_a_fresh_process():
    """With glibc here, keep_freed_memory() sets the thresholds, and with the variable set it does not."""
    code = "from explain_cli import job; print(job.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != job.NO_MALLOPT_ENV}
    glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc") if "CS_GNU_LIBC_VERSION" in os.confstr_names else False
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, job.NO_MALLOPT_ENV: "1"}, capture_output=True,
                         text=True, check=True)
    assert default.stdout.strip() == str(glibc) and off.stdout.strip() == "False"
