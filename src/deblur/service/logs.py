"""Logging set-up of the service: keys sent in the query never reach a log line."""

from __future__ import annotations

import copy
import logging
import re
from urllib.parse import unquote_plus

from uvicorn.config import LOGGING_CONFIG

SECRET_NAMES = frozenset({"code", "key", "api_key", "sig"})
# a query parameter in a logged URL: separator, name as sent, value as sent (up to the next & or space,
# as Starlette reads it: a key may contain ; # or ")
QUERY_PARAMETER = re.compile(r"([?&])([^=&?\s]*)=([^&\s]*)")


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
    """``value`` with the keys in its query strings masked (non-strings unchanged).

    A parameter is a key when its name, percent-decoded (repeatedly) and case-folded, is one of
    ``SECRET_NAMES``: Starlette decodes names, so ``?%63ode=`` and ``?CODE=`` are masked as ``?code=`` is.
    """
    return QUERY_PARAMETER.sub(_mask, value) if isinstance(value, str) else value


def _mask(match: re.Match) -> str:
    return f"{match[1]}{match[2]}=***" if secret_name(match[2]) else match[0]


def secret_name(name: str) -> bool:
    """Whether the query parameter ``name`` (as sent) names a key once decoded, in any case."""
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded.strip().lower() in SECRET_NAMES:
            return True
        if decoded == name:
            return False
        name = decoded
    return True   # still percent-encoded after four rounds: mask rather than guess


def uvicorn_log_config() -> dict:
    """uvicorn's logging set-up with ``RedactSecrets`` on its handlers (the access log shows each query)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config
