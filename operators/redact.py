"""Keeping credentials out of everything a job writes or prints.

Credentials reach vidprune only through the environment (the spec refuses them), and
nothing copies them into messages on purpose. :func:`redact` is the last line of defence
for text that comes from elsewhere (an exception from a storage library, a decoder's log):
every error message that goes into an output table, ``job.json`` or the job's log passes
through it.
"""

from __future__ import annotations

import os
import re

#: Environment variables whose values are secrets (s3fs/botocore read them).
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "AWS_ACCESS_KEY_ID")
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
# Presigned-URL signatures and the like, should a URL ever end up in a message.
_QUERY_SECRETS = re.compile(r"(?i)((?:x-amz-(?:signature|credential|security-token))|"
                            r"signature|awsaccesskeyid)=[^&\s\"']+")


def _secret_values() -> list[str]:
    names = set(SECRET_VARIABLES) | {k for k in os.environ
                                     if any(w in k.upper() for w in _SECRET_WORDS)}
    # Short values ("1", "true") would blank out ordinary words: only real secrets.
    return sorted({os.environ[k] for k in names if len(os.environ.get(k) or "") >= 8},
                  key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with the values of secret environment variables and URL signatures
    replaced by ``***``."""
    for value in _secret_values():
        if value in text:
            text = text.replace(value, "***")
    return _QUERY_SECRETS.sub(lambda m: f"{m.group(1)}=***", text)
