"""Whether a run's bad records stop it: one rule, applied by the run and by `vlmablate.data.check` alike.

A run meets bad records in three places: the scan before training, the preflight that encodes the first
`data.preflight_records` samples of each source, and training itself (what only decoding finds).
`judge` turns what has been found so far into a `Verdict` under the data config's `BadPolicy`:

- `on_bad_sample=error`: any bad record stops the run.
- `on_bad_sample=skip`: the run stops when the bad records' share of all records passes
  `max_bad_fraction`, or when more than `max_bad_in_a_row` consecutive samples of a source fail to
  encode (a skipped sample is replaced by the next one of its source that encodes; a source whose
  every sample fails has nothing to serve).

The run applies it after the scan (`sources.build_dataset`), after its preflight (`train.runner`) and
at every batch (`BadRecordTally`); `vlmablate.data.check` applies it to the same counts, so its "OK"
means the run will not stop for its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmablate.data.errors import DataError

ON_BAD_SAMPLE = ("error", "skip")


@dataclass(frozen=True)
class BadPolicy:
    """The bad-record settings of the data config (`data.on_bad_sample`, `max_bad_fraction`, `max_bad_in_a_row`)."""

    on_bad_sample: str = "error"
    max_bad_fraction: float = 0.01
    max_bad_in_a_row: int = 16

    def __post_init__(self):
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise DataError(f"data.on_bad_sample={self.on_bad_sample!r} is not one of {ON_BAD_SAMPLE}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise DataError(f"data.max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]")
        if self.max_bad_in_a_row < 0:
            raise DataError(f"data.max_bad_in_a_row={self.max_bad_in_a_row} must be >= 0")

    @classmethod
    def of(cls, data) -> BadPolicy:
        """The policy of a `DataConfig`."""
        return cls(data.on_bad_sample, data.max_bad_fraction, data.max_bad_in_a_row)


@dataclass(frozen=True)
class Verdict:
    """What the bad records found so far mean for the run. `stops` with `why` when they stop it."""

    records: int
    scanned: dict[str, int]  # bad records the scan found, by reason
    encoded: dict[str, int]  # bad records only encoding found (preflight, training, a check's decode pass)
    in_a_row: dict[str, int] = field(default_factory=dict)  # source -> longest stretch failing to encode
    stops: bool = False
    why: str | None = None

    @property
    def bad(self) -> int:
        return sum(self.scanned.values()) + sum(self.encoded.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.records if self.records else 0.0

    def by_reason(self) -> dict[str, int]:
        merged = dict(self.scanned)
        for reason, n in self.encoded.items():
            merged[reason] = merged.get(reason, 0) + n
        return dict(sorted(merged.items()))

    def to_dict(self) -> dict:
        return {"records": self.records, "bad": self.bad, "bad_fraction": round(self.bad_fraction, 6),
                "bad_by_reason": self.by_reason(), "found_by_scan": sum(self.scanned.values()),
                "found_when_encoded": sum(self.encoded.values()), "longest_bad_run": dict(self.in_a_row),
                "stops": self.stops, "why": self.why}

    def raise_if_stops(self) -> None:
        if self.stops:
            raise DataError(self.why, "too_many_bad_records")


def judge(policy: BadPolicy, *, records: int, scanned: dict[str, int], encoded: dict[str, int] | None = None,
          in_a_row: dict[str, tuple[int, int]] | None = None, examples: list[str] | None = None) -> Verdict:
    """The verdict on `records` records of which `scanned` (by reason) were found bad by the scan and `encoded`
    only when encoded; `in_a_row` maps a source to (its longest stretch of consecutive samples that fail to
    encode, the samples it has in the mix); `examples` are bad records' references for the message."""
    encoded = dict(sorted((encoded or {}).items()))
    runs = in_a_row or {}
    verdict = Verdict(records, dict(sorted(scanned.items())), encoded, {k: run for k, (run, _) in runs.items()})
    why = None
    if policy.on_bad_sample == "error" and verdict.bad:
        why = (f"{verdict.bad} of {records} records are bad ({verdict.by_reason()}) and data.on_bad_sample=error "
               "stops at the first; set data.on_bad_sample=skip to leave them out")
    elif verdict.bad_fraction > policy.max_bad_fraction:
        found = f"; found while encoding: {encoded}" if encoded else ""
        found += f", e.g. {examples}" if encoded and examples else ""
        why = (f"{verdict.bad} of {records} records are bad ({verdict.bad_fraction:.2%}{found}), more than "
               f"data.max_bad_fraction={policy.max_bad_fraction:.2%}: fix the data, or raise the limit knowingly")
    else:
        broken = [(name, run, size) for name, (run, size) in runs.items()
                  if breaks_substitution(run, size, policy.max_bad_in_a_row)]
        if broken:
            name, run, size = broken[0]
            why = (f"data source {name!r}: {run} of its {size} samples in a row fail to encode, more than "
                   f"data.max_bad_in_a_row={policy.max_bad_in_a_row}: the source looks broken")
    return Verdict(**{**verdict.__dict__, "stops": why is not None, "why": why})


def breaks_substitution(run: int, size: int, limit: int) -> bool:
    """Whether `run` consecutive failing samples of a source of `size` samples stop a run under `skip`: a
    failing sample is replaced by the next of its source that encodes, looking at most `limit` samples on."""
    return run > limit or (size > 0 and run >= size)


def longest_bad_run(failed) -> int:
    """The longest stretch of consecutive True in `failed`, wrapping around at the end, as the substitute
    search does (the whole length when every entry is True)."""
    failed = np.asarray(failed, dtype=bool)
    if failed.all():
        return len(failed)
    # rotate so the sequence starts right after a success: no stretch then wraps
    start = int(np.flatnonzero(~failed)[-1]) + 1
    rolled = np.concatenate([failed[start:], failed[:start]])
    best = run = 0
    for bad in rolled:
        run = run + 1 if bad else 0
        best = max(best, run)
    return best


class BadRecordTally:
    """Records found bad while encoding (`data.on_bad_sample=skip`), each counted once per run.

    A bad record is met again and again: as its own sample in every epoch, and as a candidate when a
    neighbour's substitute is looked for. Samples carry `(record_ref, reason)` pairs for what they skipped;
    the tally keeps one reason per record reference, so the counts by reason add up to the number of
    distinct bad records, whatever the epochs, substitutions or ranks. `records` and `scanned_bad` (what the
    scan already found: a count, or counts by reason) are judged with them under `limit`
    (data.max_bad_fraction); `found` seeds it with the records the preflight already found bad.
    """

    def __init__(self, records: int = 0, scanned_bad: int | dict[str, int] = 0, limit: float | None = None,
                 found: dict[str, str] | None = None):
        self.records, self.limit = records, limit
        self.scanned = dict(scanned_bad) if isinstance(scanned_bad, dict) else \
            ({"found by the scan": scanned_bad} if scanned_bad else {})
        self.reasons: dict[str, str] = dict(found or {})  # record reference -> reason

    def add(self, entries) -> None:
        """Count the `(record_ref, reason)` pairs of one batch; raise once the bad share passes the limit."""
        for ref, reason in entries:
            self.reasons.setdefault(ref, reason)
        if self.limit is None or not self.records:
            return
        judge(BadPolicy("skip", self.limit), records=self.records, scanned=self.scanned, encoded=self.counts(),
              examples=self.examples(3)).raise_if_stops()

    def counts(self) -> dict[str, int]:
        """Distinct bad records by reason, sorted by reason."""
        counts: dict[str, int] = {}
        for reason in self.reasons.values():
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))

    def examples(self, n: int = 10) -> list[str]:
        return sorted(self.reasons)[:n]
