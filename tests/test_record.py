"""run.json as one schema (explain_cli/record.py): files written before the schema existed still load
and are written back unchanged; a malformed one is a clear error (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.record import RunRecord, RunRecordError

#: run.json files written by explain-cli at commit 1600aa7 (before RunRecord): an unsharded run, a
#: shard, and a merge of two shards (paths rewritten to /home/user/project).
OLD = Path(__file__).parent / "data" / "run_json_1600aa7"


@pytest.mark.parametrize("name", ["run.json", "run.shard-0-of-2.json", "merged.json"])
def test_a_run_json_from_before_the_schema_loads_and_round_trips(name):
    data = json.loads((OLD / name).read_text())
    record = RunRecord.read(OLD / name)
    assert record.dump() == data  # nothing lost, nothing added
    assert record.status == "complete" and record.counts is not None and record.runs


def test_the_typed_parts_of_an_old_run_json():
    run = RunRecord.read(OLD / "run.json")
    assert run.fingerprint is not None and isinstance(run.fingerprint.settings, dict)
    assert run.counts.explained == 3 and run.runs[-1].exit_code == 0
    shard = RunRecord.read(OLD / "run.shard-0-of-2.json")
    assert (shard.shard.index, shard.shard.count) == (0, 2) and shard.runs[-1].shard == "0/2"
    merged = RunRecord.read(OLD / "merged.json")
    assert merged.merged is True and merged.counts.images == 3 and len(merged.per_shard) == 2


def test_readers_of_an_old_run_json(tmp_path):
    from explain_cli import merge, resume
    from explain_cli.job import earlier_runs

    shutil.copyfile(OLD / "run.json", tmp_path / "run.json")
    assert resume.stored_fingerprint(tmp_path / "run.json") == json.loads((OLD / "run.json").read_text())["fingerprint"]
    assert [r.dump() for r in earlier_runs(tmp_path / "run.json")] == json.loads((OLD / "run.json").read_text())["runs"]
    assert merge._load_run_json(OLD / "run.shard-0-of-2.json").images_found == 3
    assert earlier_runs(OLD / "merged.json") == []  # a merge's records are its shards'


def test_a_run_json_of_a_newer_version_keeps_its_unknown_entries():
    data = {**json.loads((OLD / "run.json").read_text()), "something_new": {"a": [1, 2]}}
    assert RunRecord.parse(data).dump() == data


@pytest.mark.parametrize("change, entry", [
    ({"counts": "3"}, "counts"),
    ({"runs": {"a": 1}}, "runs"),
    ({"shard": {"index": "0", "count": 2}}, "shard.index"),
    ({"images_found": 2.5}, "images_found"),
    ({"merged": "yes"}, "merged"),
    ({"metrics": {"rows": [1]}}, "metrics.rows"),
    ({"fingerprint": {"settings": ["a"]}}, "fingerprint.settings"),
])
def test_a_malformed_run_json_is_an_error_naming_the_entry(tmp_path, change, entry):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**json.loads((OLD / "run.json").read_text()), **change}))
    with pytest.raises(RunRecordError) as info:
        RunRecord.read(path)
    assert str(path) in str(info.value) and entry in str(info.value), str(info.value)
    lenient = RunRecord.read(path, lenient=True)  # the report's and a run's earlier records' reading
    assert entry.split(".")[0] in lenient.dropped and entry.split(".")[0] not in lenient.dump()
    assert lenient.status == "complete"


@pytest.mark.parametrize("text, words", [("{not json", "cannot read"), ("[1, 2]", "not a JSON object")])
def test_a_run_json_that_is_no_json_object_is_an_error(tmp_path, text, words):
    path = tmp_path / "run.json"
    path.write_text(text)
    for lenient in (False, True):
        with pytest.raises(RunRecordError, match=words):
            RunRecord.read(path, lenient=lenient)


def test_merge_of_a_malformed_shard_run_json_is_exit_2_naming_file_and_entry(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in (0, 1):
        info = json.loads((OLD / "run.shard-0-of-2.json").read_text())
        info["shard"] = {"index": i, "count": 2}
        if i == 1:
            info["counts"] = ["broken"]
        (out / f"run.shard-{i}-of-2.json").write_text(json.dumps(info))
        (out / f"topk.shard-{i}-of-2.csv").write_text("image,rank\n")
        (out / f"errors.shard-{i}-of-2.csv").write_text("image,error\n")
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 2, result.output
    assert "run.shard-1-of-2.json" in result.output and "counts" in result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
