"""Logging set-up of the service: keys sent in the query never reach a log line."""

from __future__ import annotations

import copy
import logging
import re

SECRET_QUERY = re.compile(r"([?&](?:code|key|api_key|sig)=)[^&\s\"]*", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Masks keys sent in the query (``?code=``, Azure's function key) in every log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) for a in record.args)
        elif isinstance(record.args, dict):   # logging's "%(name)s" form
            record.args = {k: redact(v) for k, v in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact(value: object) -> object:
    """``value`` with the keys in its query strings masked (non-strings unchanged)."""
    return SECRET_QUERY.sub(r"\1***", value) if isinstance(value, str) else value


def uvicorn_log_config() -> dict:
    """uvicorn's logging set-up with ``RedactSecrets`` on its handlers (the access log shows each query)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config
