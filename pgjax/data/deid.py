"""De-identification helpers: the salt, salted identity keys, and redaction.

Patient, study, series, instance and site identity leave the reader only as salted keys
(`hash_key`). The salt is the secret that makes the keys one-way: whoever holds it can hash a
candidate PatientID and look it up, so it lives outside the store, readable by its owner only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import warnings
from pathlib import Path

SALT_BYTES = 32
MIN_SALT_CHARS = 16
MIN_SALT_BYTES = 16
KEY_HEX_CHARS = 16

_KIND = re.compile(r"[a-z][a-z0-9_-]*")


def load_or_create_salt(path: str | Path, *, forbidden_root: str | Path | None = None) -> bytes:
    """The salt in `path` (hex text), created with 32 random bytes if the file does not exist.

    A new file gets mode 0600 and its missing parent folders are created. `forbidden_root` is
    the store: a salt inside it would travel with the store and let anyone holding both
    re-identify patients by hashing candidate IDs, so such a path is refused.
    """
    path = Path(path).expanduser()
    if forbidden_root is not None:
        root = Path(forbidden_root).expanduser().resolve()
        if path.resolve().is_relative_to(root):
            raise ValueError(
                f"{path}: the salt file must live outside the store ({root}); whoever has "
                "the store and the salt can re-identify patients"
            )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: when parallel workers race to create the salt, exactly one wins and the
            # others read its salt below.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_bytes(SALT_BYTES).hex() + "\n")
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the salt file: {e.strerror or e}") from e
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: the salt file must hold hex digits only") from None
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(
            f"{path}: the salt is {len(salt)} bytes; at least {MIN_SALT_BYTES} are needed"
        )
    return salt


def salt_from_string(s: str) -> bytes:
    """A salt given by the user (e.g. from a secret store), as UTF-8 bytes.

    Fewer than 16 characters is refused: a short salt can be brute-forced together with the
    (few) plausible PatientIDs.
    """
    if not isinstance(s, str) or len(s) < MIN_SALT_CHARS:
        n = len(s) if isinstance(s, str) else 0
        raise ValueError(f"the salt must be at least {MIN_SALT_CHARS} characters, not {n}")
    return s.encode("utf-8")


def hash_key(salt: bytes, kind: str, value: str) -> str:
    """The salted key of an identifier: HMAC-SHA256(salt, kind + "\\0" + value), 16 hex chars.

    `kind` ("patient", "study", "series", "instance", "site", ...) is a namespace, so the same
    string in two roles gives unrelated keys. Surrounding spaces and NUL padding of `value` are
    ignored (DICOM pads values to an even length).

    64 bits: by the birthday bound, n keys collide with probability about n^2 / 2^65, i.e.
    3e-8 for 1e6 patients and 3e-4 for 1e8 instances; collisions are harmless beyond merging two
    items' identities.
    """
    if not isinstance(salt, bytes | bytearray) or not salt:
        raise ValueError("hash_key needs a non-empty salt (bytes)")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"hash_key kind must be lowercase letters, digits, '_' or '-': {kind!r}")
    if value is None:
        raise ValueError(f"hash_key: no {kind} identifier (None)")
    if not isinstance(value, str):
        raise TypeError(
            f"hash_key: the {kind} identifier must be a str, not {type(value).__name__}"
        )
    value = value.strip(" \0")
    if not value:
        raise ValueError(f"hash_key: empty {kind} identifier")
    message = kind.encode("utf-8") + b"\0" + value.encode("utf-8")
    return hmac.new(bytes(salt), message, hashlib.sha256).hexdigest()[:KEY_HEX_CHARS]


# The one identity of every file with neither a PatientID nor a PatientName.
UNIDENTIFIED_PATIENT = "no-patient-identity"


def patient_identity(patient_id: str, patient_name: str) -> tuple[str, str]:
    """(hash_key kind, value) of the patient a file belongs to.

    PatientID when there is one; else the PatientName (spaces, case and "^" normalised); else
    one shared identity for all such files. The patient key is what the vocabulary counts
    towards K and what splits keep together, so a file without a PatientID must not become a
    new patient of its own: a person with eight studies and no PatientID would count as eight
    patients, and a phrase only they carry would become a token. Treating all unidentifiable
    files as one patient errs the safe way on both counts: they count once towards K, and they
    never straddle the train/test border (they may be one person). The cost: such files all go
    to one split.
    """
    patient_id = (patient_id or "").strip(" \0")
    if patient_id:
        return "patient", patient_id
    name = " ".join((patient_name or "").replace("^", " ").replace("=", " ").upper().split())
    if name:
        return "patient-name", name
    return "patient-unidentified", UNIDENTIFIED_PATIENT


def redact(value: str) -> str:
    """A redacted form of an identifier for reports: 'NG***IA (9 chars)'.

    Two characters are shown at each end of values of 8 or more characters, one at the start
    of shorter ones, so a report never holds a whole identifier.
    """
    n = len(value)
    if n >= 8:
        shown = f"{value[:2]}***{value[-2:]}"
    elif n >= 2:
        shown = f"{value[:1]}***"
    else:
        shown = "***"
    return f"{shown} ({n} chars)"


class _WithheldValues(logging.Filter):
    """Replaces pydicom's warnings about element values, which quote the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            record.msg = "pydicom warning withheld (it may quote a header value)"
            record.args = ()
        return True


_PYDICOM_FILTER = _WithheldValues()


def redact_pydicom_logs() -> None:
    """Keep header values out of logs: pydicom logs invalid values verbatim ("Invalid value for
    VR LO: 'DOE^JOHN ...'") through the 'pydicom' logger. Idempotent; call in every process."""
    logger = logging.getLogger("pydicom")
    if _PYDICOM_FILTER not in logger.filters:
        logger.addFilter(_PYDICOM_FILTER)


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's warnings, which quote header values ("Invalid value for VR UI: '1.2...'")
    on stderr, where batch jobs keep their logs. What went wrong is reported per file instead
    (the private skip list)."""
    redact_pydicom_logs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
