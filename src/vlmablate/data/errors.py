"""Why a record cannot be trained on: one error type for data files and records, with a reason code.

`data.on_bad_sample=error` stops at the first bad record with a message that names the source file,
the record's index and id, and the reason; `skip` counts records by these codes and writes the
counts to `summary.json`.
"""

from __future__ import annotations

REASONS = {
    "invalid_json": "a line of a JSON Lines file that is not valid JSON (the message names the line)",
    "malformed_record": "not an object, no 'conversations' list, or an 'image' that is not one path",
    "empty_turns": "no turns, or a turn with an empty value",
    "unknown_role": "a turn whose role is not human/user, gpt/assistant or system",
    "non_alternating": "human and gpt turns do not alternate, or there is no gpt turn",
    "misplaced_image_marker": "<image> in a gpt or system turn",
    "too_many_image_markers": "more <image> markers than the model takes (one)",
    "marker_without_image": "<image> in the text but the record has no image",
    "image_without_marker": "an image but no <image> in the text",
    "image_outside_root": "the image path resolves outside the image root (never opened)",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file cannot be decoded",
    "too_long": "longer than max_length with the image tokens in the part that would be cut",
    "answer_truncated": "max_length cuts off every token that carries a loss (nothing left to learn)",
    "invalid_conversation": "the template or processor cannot encode the conversation",
}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, record and reason."""

    def __init__(self, message: str, reason: str = "malformed_record"):
        super().__init__(message)
        self.reason = reason


class BadRecordTally:
    """Records found bad while encoding (`data.on_bad_sample=skip`), each counted once per run.

    A bad record is met again and again: as its own sample in every epoch, and as a candidate when a
    neighbour's substitute is looked for. Samples carry `(record_ref, reason)` pairs for what they skipped;
    the tally keeps one reason per record reference, so the counts by reason add up to the number of
    distinct bad records, whatever the epochs, substitutions or ranks. `records` and `scanned_bad` (what the
    scan already found) set the share held to `limit` (data.max_bad_fraction).
    """

    def __init__(self, records: int = 0, scanned_bad: int = 0, limit: float | None = None):
        self.records, self.scanned_bad, self.limit = records, scanned_bad, limit
        self.reasons: dict[str, str] = {}  # record reference -> reason

    def add(self, entries) -> None:
        """Count the `(record_ref, reason)` pairs of one batch; raise once the bad share passes the limit."""
        for ref, reason in entries:
            self.reasons.setdefault(ref, reason)
        bad = self.scanned_bad + len(self.reasons)
        if self.limit is not None and self.records and bad / self.records > self.limit:
            raise DataError(f"{bad} of {self.records} records are bad ({bad / self.records:.2%}; found while "
                            f"encoding: {self.counts()}, e.g. {self.examples(3)}), more than "
                            f"data.max_bad_fraction={self.limit:.2%}")

    def counts(self) -> dict[str, int]:
        """Distinct bad records by reason, sorted by reason."""
        counts: dict[str, int] = {}
        for reason in self.reasons.values():
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))

    def examples(self, n: int = 10) -> list[str]:
        return sorted(self.reasons)[:n]
