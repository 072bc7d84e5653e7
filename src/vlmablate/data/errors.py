"""Why a record cannot be trained on: one error type for data files and records, with a reason code.

`data.on_bad_sample=error` stops at the first bad record with a message that names the source file,
the record's index and id, and the reason; `skip` counts records by these codes and writes the
counts to `summary.json` (`verdict.py` says when they stop a run).
"""

from __future__ import annotations

REASONS = {
    "invalid_json": "a line of a JSON Lines file that is not valid JSON (the message names the line)",
    "malformed_record": "not an object, no 'conversations' list, an 'image' that is not one path, or a turn "
                        "whose value is not a string",
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
    "non_finite_number": "NaN or Infinity in a field (Python's json writes them; JSON has no such number)",
}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, record and reason."""

    def __init__(self, message: str, reason: str = "malformed_record"):
        super().__init__(message)
        self.reason = reason
