"""One lock implementation (job.output_lock / job.lock_held) for runs and merge (issue 30.5)."""

from __future__ import annotations

import fcntl

import pytest

from explain_cli.errors import UserError
from explain_cli.job import lock_held, output_lock


def test_lock_held_never_creates_the_file_and_sees_another_holder(tmp_path):
    path = tmp_path / ".explain-cli.lock"
    assert not lock_held(path) and not path.exists()
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(path)
    assert not lock_held(path)


def test_merge_and_an_unsharded_run_exclude_each_other_and_shards(tmp_path):
    with output_lock(tmp_path, "", merging=True):
        with pytest.raises(UserError, match="another explain-cli run or merge is writing"):
            with output_lock(tmp_path, "", merging=True):
                pass
        with pytest.raises(UserError, match="an unsharded run or a merge"):
            with output_lock(tmp_path, ".shard-0-of-2"):
                pass
    with output_lock(tmp_path, ".shard-0-of-2"):
        assert lock_held(tmp_path / ".explain-cli.shard-0-of-2.lock")
        with output_lock(tmp_path, ".shard-1-of-2"):  # shards share the folder
            pass
        with pytest.raises(UserError, match="run or merge is writing"):
            with output_lock(tmp_path, "", merging=True):
                pass
        with pytest.raises(UserError, match="shard 0/2"):  # an unsharded run names the running shard
            with output_lock(tmp_path, ""):
                pass
    assert not lock_held(tmp_path / ".explain-cli.shard-0-of-2.lock")
