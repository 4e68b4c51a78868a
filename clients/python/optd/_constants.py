"""The constants every optd client shares (api/client_constants.json in the
optd repository); tests/test_constants.py checks them against that file."""

from typing import Dict

#: Retries after the first attempt for connection failures, timeouts and 503s.
RETRIES = 4
#: First retry wait, in seconds; it doubles per retry up to MAX_BACKOFF.
BACKOFF = 0.05
MAX_BACKOFF = 2.0
#: A Retry-After longer than this (seconds) is a daemon asking for more
#: patience than a training step should wait blind.
MAX_RETRY_AFTER = 30.0
#: Vectors up to this many elements go as JSON (readable in logs, and the
#: text is small); longer ones as raw little-endian bytes, which skips the
#: formatting and parsing of every number on both ends.
BINARY_THRESHOLD = 256
#: Session names.
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
#: Header names, by what they carry.
HEADERS: Dict[str, str] = {
    "idempotency_key": "Idempotency-Key",
    "loss": "Optd-Loss",
    "base_step": "Optd-Base-Step",
    "worker": "Optd-Worker",
    "dtype": "Optd-Dtype",
    "step": "Optd-Step",
    "lr": "Optd-Lr",
    "pending": "Optd-Pending",
    "replayed": "Optd-Replayed",
    "skipped": "Optd-Skipped",
    "params_crc32": "Optd-Params-Crc32",
}
