"""What every PACS source provides: a search that lists instances, and a retrieval.

A source is searched once per pull (`find`), giving studies with their instances' UIDs; the
pull then asks it for the instances it does not have yet (`retrieve`). Errors come in two kinds:
`TransientError` (the PACS is down or busy: retried with back-off, then the pull stops and a
rerun resumes) and permanent ones (`PacsError` and subclasses: bad credentials, an unknown AE
title, an object the PACS cannot deliver), which say what to fix.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable


class PacsError(RuntimeError):
    """A failure that retrying will not fix; the message says what to change."""


class AuthError(PacsError):
    """The PACS refused our credentials (or wants some)."""


class AssociationError(PacsError):
    """A DIMSE association was refused (unknown AE title, no matching service)."""


class MoveRefused(AssociationError):
    """The PACS will not C-MOVE to our AE title (unknown destination, or not allowed)."""


class TransientError(PacsError):
    """The PACS is unreachable, busy or failing; a later rerun may succeed."""


@dataclasses.dataclass(frozen=True)
class InstanceRef:
    study: str  # StudyInstanceUID
    series: str  # SeriesInstanceUID
    sop: str  # SOPInstanceUID
    sop_class: str = ""


@dataclasses.dataclass
class StudyRef:
    uid: str
    instances: list[InstanceRef]


# Called with (SOP Instance UID, the instance as a DICOM file's bytes) for every instance
# received; a source calls it from any thread.
Sink = Callable[[str, bytes], None]


def with_retries(fn: Callable, *, retries: int, backoff_s: float, what: str):
    """fn() retried on TransientError with exponential back-off and jitter (cap 30 s).

    `what` goes into the final message: it must not hold identifiers (UIDs are identifiers).
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except TransientError as e:
            if attempt == retries:
                if "(gave up" in str(e):  # an inner retry loop has said it already
                    raise
                raise TransientError(f"{what}: {e} (gave up after {retries + 1} tries)") from e
            delay = min(30.0, backoff_s * 2**attempt) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")
