"""DICOMweb: QIDO-RS search (studies, then series, then instances, paged) and WADO-RS retrieval.

Plain `requests`, for control over the two details servers differ on: query values are sent
with `*` unencoded (Orthanc 1.10 does not decode `%2A`), and instances are asked for in the
transfer syntax they are stored in (`transfer-syntax=*`), so the bytes preprocessed are the
bytes the PACS holds, as with a local copy.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import requests

from pgjax.pacs.source import (
    AuthError,
    InstanceRef,
    PacsError,
    Sink,
    StudyRef,
    TransientError,
    with_retries,
)

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
# Query keys that filter series rather than studies.
SERIES_KEYS = {"Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "SeriesDate"}  # fmt: skip
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def split_query(query: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(study-level, series-level) filters. A Modality filter also narrows the study search."""
    study, series = {}, {}
    for key, value in query.items():
        (series if key in SERIES_KEYS else study)[key] = value
    if "Modality" in series and "ModalitiesInStudy" not in study:
        study["ModalitiesInStudy"] = series["Modality"]
    return study, series


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2046), headers dropped."""
    m = re.search(r'boundary="?([^";,\s]+)"?', content_type or "", re.IGNORECASE)
    if not m or not content_type.lower().startswith("multipart/"):
        raise PacsError(f"expected a multipart/related answer, got {content_type!r}")
    delimiter = b"\r\n--" + m.group(1).encode()
    parts = []
    for chunk in (b"\r\n" + body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _, sep, data = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(data)
    return parts


def _ssl_cause(e: BaseException) -> BaseException | None:
    """The ssl module's exception inside a requests error, if any."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ssl.SSLError):
            return x
        stack += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
        stack += [c for c in (x.__cause__, x.__context__, getattr(x, "reason", None)) if c]
    return None


def redact_path(path: str) -> str:
    """A request path for messages and logs: UIDs are identifiers, so they are left out."""
    return re.sub(r"/(studies|series|instances)/[^/?]+", r"/\1/{uid}", path)


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class DicomwebSource:
    """A DICOMweb server (e.g. https://pacs/dicom-web). Thread-safe for retrieval."""

    kind = "dicomweb"

    def __init__(
        self,
        url: str,
        *,
        auth=None,
        verify: bool | str = True,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        page_size: int = 100,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--dicomweb wants an http(s) URL, not {url!r}")
        if parts.username or parts.password:
            raise ValueError(
                "credentials in the URL would land in shell history and logs; use "
                "PGJAX_PACS_USER/PGJAX_PACS_PASSWORD, PGJAX_PACS_TOKEN or --auth-file"
            )
        self.url = url.rstrip("/")
        self.auth, self.verify, self.timeout_s = auth, verify, timeout_s
        self.retries, self.backoff_s, self.page_size = retries, backoff_s, page_size
        self._local = threading.local()  # one requests session per thread

    @property
    def name(self) -> str:
        return urlsplit(self.url).netloc

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.auth = self.auth
        return s

    def _get_once(self, path: str, params: dict | None, accept: str) -> requests.Response:
        url = self.url + path
        if params:
            url += "?" + "&".join(
                f"{quote(k, safe='')}={quote(str(v), safe='*,-.^')}" for k, v in params.items()
            )
        try:
            # verify per request: a session's setting loses to REQUESTS_CA_BUNDLE in requests.
            r = self._session().get(
                url, headers={"Accept": accept}, timeout=self.timeout_s, verify=self.verify
            )
        except requests.exceptions.SSLError as e:
            cause = _ssl_cause(e)
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise PacsError(
                    f"{self.name}: TLS verification failed ({cause.verify_message}); pass the "
                    "server's CA with --ca-bundle FILE"
                ) from e
            # A TLS connection cut short (the server restarting, a proxy timing out) is worth
            # another try; the message names the TLS reason only (requests' names the URL).
            reason = getattr(cause, "reason", None) or type(cause or e).__name__
            raise TransientError(f"{self.name}: TLS error ({reason})") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(f"{self.name}: {type(e).__name__}") from e
        if r.status_code in (401, 403):
            raise AuthError(
                f"{self.name}: the server refused the credentials (HTTP {r.status_code}); set "
                "PGJAX_PACS_USER/PGJAX_PACS_PASSWORD or PGJAX_PACS_TOKEN, or --auth-file"
            )
        if r.status_code in RETRYABLE_STATUS:
            raise TransientError(f"{self.name}: HTTP {r.status_code} for {redact_path(path)}")
        return r

    def _get(self, path: str, params=None, accept="application/dicom+json") -> requests.Response:
        return with_retries(
            lambda: self._get_once(path, params, accept),
            retries=self.retries,
            backoff_s=self.backoff_s,
            what=f"GET {redact_path(path)}",
        )

    def search(self, path: str, params: dict[str, str]) -> Iterator[dict]:
        """Every match of a QIDO-RS search, page by page (limit/offset)."""
        offset, seen = 0, set()
        while True:
            r = self._get(path, {**params, "limit": self.page_size, "offset": offset})
            if r.status_code == 204:
                return
            if r.status_code != 200:
                raise PacsError(
                    f"{self.name}: QIDO-RS {redact_path(path)} answered HTTP {r.status_code}"
                )
            page = r.json() if r.content else []
            fresh = [m for m in page if repr(sorted(m.items())) not in seen]
            seen.update(repr(sorted(m.items())) for m in fresh)
            yield from fresh
            # A server that ignores offset repeats its first page: stop rather than loop.
            if len(page) < self.page_size or not fresh:
                return
            offset += len(page)

    def find(self, query: dict[str, str]) -> list[StudyRef]:
        study_q, series_q = split_query(query)
        studies = []
        for st in self.search("/studies", study_q):
            study = _value(st, STUDY_UID)
            refs = []
            for se in self.search(f"/studies/{study}/series", series_q):
                series = _value(se, SERIES_UID)
                for inst in self.search(f"/studies/{study}/series/{series}/instances", {}):
                    refs.append(
                        InstanceRef(study, series, _value(inst, SOP_UID), _value(inst, SOP_CLASS))
                    )
            if refs:
                studies.append(StudyRef(study, refs))
        return studies

    def fetch_instance(self, ref: InstanceRef) -> bytes:
        path = f"/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"
        r = self._get(path, accept=ACCEPT_DICOM)
        if r.status_code == 406:
            raise PacsError("the server cannot send it in its stored transfer syntax (HTTP 406)")
        if r.status_code == 404:
            raise PacsError("the server no longer has it (HTTP 404)")
        if r.status_code != 200:
            raise PacsError(f"WADO-RS answered HTTP {r.status_code}")
        parts = parse_multipart(r.headers.get("Content-Type", ""), r.content)
        if len(parts) != 1:
            raise PacsError(f"WADO-RS sent {len(parts)} parts for one instance")
        return parts[0]

    def retrieve_study(self, study: StudyRef, wanted: list[InstanceRef], sink: Sink) -> str | None:
        """Fetch the wanted instances one by one into the sink; a note on the ones that failed.

        Transient errors (after retries) and refused credentials end the study; an instance the
        server cannot deliver costs that instance only.
        """
        problems = Counter()
        for ref in wanted:
            try:
                data = self.fetch_instance(ref)
            except (TransientError, AuthError):
                raise
            except PacsError as e:
                problems[str(e)] += 1
                continue
            sink(ref.sop, data)
        return "; ".join(f"{n} instance(s): {why}" for why, n in sorted(problems.items())) or None

    def check(self) -> None:
        """One cheap request, so bad credentials or a wrong URL fail before any work."""
        r = self._get("/studies", {"limit": 1})
        if r.status_code not in (200, 204):
            raise PacsError(
                f"{self.name}: QIDO-RS /studies answered HTTP {r.status_code}; is {self.url} "
                "the DICOMweb root (e.g. http://host:8042/dicom-web)?"
            )
