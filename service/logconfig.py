"""JSON logs, one object per line, with secrets kept out by construction.

The formatter writes only a fixed set of fields: the message and whitelisted ``extra`` keys
(ids, outcomes, durations). Request bodies, headers and query strings are never passed to a
logger, and an ``extra`` key that is not on the list is dropped, not printed.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

ALLOWED_EXTRA = frozenset(
    {
        "request_id",
        "account_id",
        "outcome",
        "duration_ms",
        "status",
        "method",
        "path",
        "reason",
        "error_type",
        "key_id",
        "key_fingerprint",
        "file",
        "host",
        "port",
        "revision",
        "count",
        "from_status",
        "to_status",
        "code",
        "attempt",
        "rotated",
        "remaining",
        "sampled",
        "retry_after",
    }
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in ALLOWED_EXTRA:
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from drivers can quote SQL parameters.
            doc["error_type"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs each request URL at INFO; URLs are safe but noisy, and uvicorn's own access
    # log would print query strings (OAuth codes): ours replaces it.
    # The database drivers log every statement with its parameters (ciphertexts, key hashes) at DEBUG.
    for name in ("httpx", "httpcore", "uvicorn.access", "alembic", "aiosqlite", "aiomysql", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
