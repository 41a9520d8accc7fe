"""run.json as one schema: :class:`RunRecord` and its parts.

The pipeline writes a run's record (``run.json``, or ``run.shard-I-of-N.json`` for a shard),
``merge`` writes the merged one, and the report, ``merge``, ``resume`` and the next run into the
folder read them back through :meth:`RunRecord.read`. Every entry is optional (a run.json of an
older version lacks the newer ones, a merged one has its own counts) and unknown entries are kept
(a newer version's run.json still loads and is written back unchanged); what is typed is the kind
of each entry, so a reader never needs to check ``isinstance(..., dict)`` before using one.

A hand-edited or damaged run.json is refused with :class:`RunRecordError` (a UserError, exit 2)
naming the file and the entry, or, read with ``lenient=True`` (the report, a run's earlier
records), loaded without its malformed entries.

Writing: only the entries that were set are written (``model_dump(exclude_unset=True)``), so an
entry that a run leaves out (``interrupted_by`` of a complete run, ``overlay_scale`` of a
per-image scale) stays absent, and one set to None is written as null, as before this schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr, Strict, ValidationError

from explain_cli.errors import UserError

Int = Annotated[int, Strict()]  # JSON's 3, not 3.0, "3" or true
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Number = Union[Int, Annotated[float, Strict()]]


class _Part(BaseModel):
    """A part of run.json: typed known entries, unknown ones kept as they are."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def dump(self) -> dict[str, Any]:
        """The entries as written (JSON types), the unset ones left out."""
        return self.model_dump(mode="json", exclude_unset=True)

    def get(self, key: str, default: Any = None) -> Any:
        """The entry ``key`` as JSON (a part becomes a dict), ``default`` when unset or None:
        the mapping reading of old code paths (the report's, a run's earlier records)."""
        value = self.dump().get(key)
        return default if value is None else value


class Digest(_Part):
    """A file's identity in a fingerprint (resume.file_digest)."""

    sha256: Str
    size: Optional[Int] = None
    mtime_ns: Optional[Int] = None
    ctime_ns: Optional[Int] = None


class FingerprintTargets(_Part):
    classes: list[Any]
    contrast: Optional[Int] = None


class Fingerprint(_Part):
    """What decides a run's numbers (resume.fingerprint): its settings and the files' digests."""

    settings: dict[str, Any]
    labels: Optional[Digest] = None
    checkpoint: Optional[Digest] = None
    truth_csv: Optional[Digest] = None
    explainer_checkpoint: Optional[Digest] = None
    model_code: Optional[dict[str, Optional[Digest]]] = None
    targets: Optional[FingerprintTargets] = None


class Shard(_Part):
    index: Int
    count: Int


class Counts(_Part):
    """A run's image counts; a merged run.json counts images, explained, failed and topk_rows."""

    selected: Optional[Int] = None
    already_done: Optional[Int] = None
    explained: Optional[Int] = None
    failed: Optional[Int] = None
    excluded: Optional[Int] = None
    not_included: Optional[Int] = None
    not_matched: Optional[Int] = None
    images: Optional[Int] = None
    topk_rows: Optional[Int] = None


class Metrics(_Part):
    """run.json ``metrics`` (metrics.RunMetrics.summary): what merge adds up is typed."""

    rows: Optional[Int] = None
    model_evaluations: Optional[Int] = None
    mean: Optional[dict[str, Any]] = None
    random_reference: Optional[dict[str, Any]] = None


class RunEntry(_Part):
    """One run into the folder (``runs``, newest last): when, how it ended, what it did, where."""

    started: Optional[Str] = None
    finished: Optional[Str] = None
    seconds: Optional[Number] = None
    status: Optional[Str] = None
    exit_code: Optional[Int] = None
    counts: Optional[Counts] = None
    host: Optional[Str] = None
    shard: Optional[Str] = None  # "I/N"


class ShardSummary(_Part):
    """A merged run.json's ``per_shard`` entry."""

    index: Int
    run_json: Str
    images: Int
    host: Optional[Str] = None
    device: Optional[Str] = None
    device_name: Optional[Str] = None
    started: Optional[Str] = None
    finished: Optional[Str] = None
    seconds: Optional[Number] = None
    counts: Optional[Counts] = None


class RunRecord(_Part):
    """A run.json: a run's (or a shard's) record, or a merge's (``merged``: true)."""

    explain_cli: Optional[Str] = None
    status: Optional[Str] = None  # running | complete | interrupted | failed
    started: Optional[Str] = None
    finished: Optional[Str] = None
    seconds: Optional[Number] = None
    config_file: Optional[Str] = None
    config: Optional[dict[str, Any]] = None  # the resolved config (config.resolved_dict)
    shard: Optional[Shard] = None
    images_found: Optional[Int] = None
    limit: Optional[Int] = None
    layer_tokens: Optional[dict[str, Any]] = None
    weights: Optional[dict[str, Any]] = None
    targets: Optional[dict[str, Any]] = None
    explainer_training: Optional[dict[str, Any]] = None
    versions: Optional[dict[str, Any]] = None
    device: Optional[Str] = None
    device_name: Optional[Str] = None
    torch_threads: Optional[Int] = None
    usable_cores: Optional[Int] = None
    workers: Optional[Int] = None
    command: Optional[list[Any]] = None
    host: Optional[Str] = None
    fingerprint: Optional[Fingerprint] = None
    overlay_scale: Optional[dict[str, Any]] = None
    runs: Optional[list[RunEntry]] = None
    counts: Optional[Counts] = None
    metrics: Optional[Metrics] = None
    interrupted_by: Optional[Str] = None
    error: Optional[Str] = None
    batch_size_used: Optional[Int] = None
    batch_size_auto: Optional[dict[str, Any]] = None
    peak_gpu_memory_mb: Optional[Number] = None
    # a merge's record
    merged: Optional[Bool] = None
    shards: Optional[Int] = None
    shard_seconds_total: Optional[Number] = None
    per_shard: Optional[list[ShardSummary]] = None
    _dropped: dict[str, str] = PrivateAttr(default_factory=dict)  # lenient read: entry -> why it was left out

    @property
    def dropped(self) -> dict[str, str]:
        """The malformed entries a lenient read left out, each with what was wrong."""
        return self._dropped

    @classmethod
    def read(cls, path: Path, lenient: bool = False) -> "RunRecord":
        """The record of ``path``. RunRecordError (naming the file and the entry) when it cannot be
        read or an entry has the wrong kind; ``lenient``: malformed entries are left out instead
        (an unreadable file or one that is no JSON object is still an error)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunRecordError(path, f"cannot read ({exc})") from None
        if not isinstance(data, dict):
            raise RunRecordError(path, f"not a JSON object but a {type(data).__name__}")
        return cls.parse(data, path, lenient)

    @classmethod
    def parse(cls, data: dict[str, Any], path: Path | str = "run.json", lenient: bool = False) -> "RunRecord":
        """The record of ``data`` (a run.json's object), as :meth:`read`."""
        dropped: dict[str, str] = {}
        while True:
            try:
                record = cls.model_validate(data)
            except ValidationError as exc:
                errors = exc.errors()
                if not lenient or not all(e["loc"] for e in errors):
                    raise RunRecordError(path, _describe(errors[0])) from None
                for e in errors:
                    dropped.setdefault(str(e["loc"][0]), _describe(e))
                data = {k: v for k, v in data.items() if k not in dropped}
            else:
                record._dropped = dropped
                return record

    def run_entry(self, exit_code: int | None) -> RunEntry:
        """This run's entry in ``runs``."""
        shard = f"{self.shard.index}/{self.shard.count}" if self.shard is not None else None
        return RunEntry(started=self.started, finished=self.finished, seconds=self.seconds, status=self.status,
                        exit_code=exit_code, counts=self.counts, host=self.host, shard=shard)

    def text(self) -> str:
        """run.json's text, as the pipeline and merge write it (before write.write_json's padding)."""
        return json.dumps(self.dump(), indent=2, default=str)


class RunRecordError(UserError):
    """A run.json that cannot be used: the file and what is wrong with it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: not an explain-cli run.json ({problem})")


def _describe(error: dict[str, Any]) -> str:
    """'fingerprint.settings: Input should be a valid dictionary' from a pydantic error."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    return f"{loc}: {error.get('msg')}" if loc else str(error.get("msg"))
