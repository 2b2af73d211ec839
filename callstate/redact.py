"""What must not leave callstate's own storage in clear: phone numbers and user ids.

Stored documents keep them (lookups need them); anything shown for diagnosis keeps only their
last characters, enough to tell two callers apart, not enough to call anyone. The text shown is
often a body that was refused for being malformed, so masking works on the text, not on parsed
JSON: any run of 7 or more digits is masked wherever it stands (a number sent as a JSON number,
under an escaped key, or cut off by the preview), and so is any string value of a personal field.
"""

from __future__ import annotations

import re

PERSONAL_FIELDS = ("number", "alias", "toNumber", "fromNumber", "request_from_user_id")
KEPT_CHARACTERS = 3
_DIGITS = re.compile(r"\d{7,}")

# `"number": "84909985668"` anywhere in JSON text, also in a body too broken to parse.
_PERSONAL_VALUE = re.compile(
    r'("(?:' + "|".join(PERSONAL_FIELDS) + r')"\s*:\s*")((?:[^"\\]|\\.)*)(")'
)


def mask(value: str) -> str:
    """`84909985668` becomes `********668`."""
    hidden = max(0, len(value) - KEPT_CHARACTERS)
    return "*" * hidden + value[hidden:]


def mask_personal(text: str) -> str:
    """JSON text with the values of personal fields and every long run of digits masked."""
    text = _PERSONAL_VALUE.sub(lambda m: m.group(1) + mask(m.group(2)) + m.group(3), text)
    return _DIGITS.sub(lambda m: mask(m.group()), text)
