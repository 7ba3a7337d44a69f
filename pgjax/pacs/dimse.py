"""DIMSE: C-FIND (study root) to list instances, C-MOVE to a Storage SCP of our own, C-GET.

C-MOVE asks the PACS to open its own association back to us and C-STORE the instances, so the
PACS must know our AE title with our host and port (its list of modalities): pgjax starts that
Storage SCP itself for the length of the pull, accepting only the PACS's AE title. C-GET brings
the instances back on our own association (no entry needed at the PACS) where the PACS allows
it: `--retrieve get`, or automatically when the PACS does not know our AE title as a move
destination (`--retrieve auto`, the default).
"""

from __future__ import annotations

import logging
import threading

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pgjax.pacs.dicomweb import split_query
from pgjax.pacs.source import (
    AssociationError,
    InstanceRef,
    MoveRefused,
    PacsError,
    Sink,
    StudyRef,
    TransientError,
    with_retries,
)

# pynetdicom logs every association event at error level; pgjax reports failures itself, once.
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

# C-GET: one presentation context per (storage class, transfer syntax), so the PACS can send
# each instance in the syntax it holds; these cover what pydicom can decode.
GET_SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1.99",
)  # fmt: skip
MAX_CONTEXTS = 128  # DICOM's limit per association (odd context IDs 1..255)
MOVE_DESTINATION_UNKNOWN = 0xA801


def parse_address(text: str) -> tuple[str, str, int]:
    """AET@HOST:PORT -> (aet, host, port)."""
    aet, at, hostport = text.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not at or not colon or not aet or not host or not port.isdigit():
        raise ValueError(f"--dimse wants AET@HOST:PORT (e.g. ORTHANC@pacs:4242), not {text!r}")
    if len(aet) > 16:
        raise ValueError(f"AE title {aet!r} is longer than 16 characters")
    return aet, host, int(port)


def _status_text(status) -> str:
    code = int(getattr(status, "Status", -1))
    comment = str(getattr(status, "ErrorComment", "") or "")
    return f"status 0x{code:04X}" + (f" ({comment})" if comment else "")


class StorageSCP:
    """Our C-STORE SCP for C-MOVE: receives instances and hands them to the sink."""

    def __init__(self, aet: str, host: str, port: int, peer_aet: str, sink: Sink):
        self.sink = sink
        self.ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = [peer_aet]  # only the PACS may send to us
        self.received = set()
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()
        try:
            self.server = self.ae.start_server(
                (host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as e:
            raise PacsError(
                f"cannot listen on {host}:{port} for C-MOVE ({e.strerror}); pick another "
                "--scp-port, or --retrieve get"
            ) from e

    def _on_store(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        try:
            self.sink(sop, event.encoded_dataset(include_meta=True))
        except Exception as e:  # out of disk, say: refuse this instance, tell the PACS
            with self._lock:
                self.failed[sop] = f"could not stage: {type(e).__name__}"
            return 0xA700
        with self._lock:
            self.received.add(sop)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


class DimseSource:
    kind = "dimse"

    def __init__(
        self,
        address: str,
        calling_aet: str,
        *,
        scp_host: str = "0.0.0.0",
        scp_port: int = 11113,
        retrieve: str = "auto",
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 1.0,
    ):
        self.called_aet, self.host, self.port = parse_address(address)
        if not calling_aet or len(calling_aet) > 16:
            raise ValueError("--calling-aet wants an AE title of 1 to 16 characters")
        if retrieve not in ("auto", "move", "get"):
            raise ValueError(f"--retrieve must be auto, move or get, not {retrieve!r}")
        self.calling_aet, self.retrieve_mode = calling_aet, retrieve
        self.scp_host, self.scp_port = scp_host, scp_port
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._scp: StorageSCP | None = None
        self._scp_lock = threading.Lock()
        self._move_refused = False

    @property
    def name(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    # -- associations ---------------------------------------------------------------------

    def _associate_once(self, contexts, ext_neg=None, handlers=None):
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        assoc = ae.associate(
            self.host, self.port, ae_title=self.called_aet, ext_neg=ext_neg, evt_handlers=handlers
        )
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            reason = rj.reason_str
            hint = ""
            if "Called AE" in reason:
                hint = f"; is {self.called_aet!r} the PACS's AE title?"
            elif "Calling AE" in reason:
                hint = f"; the PACS does not know our AE title {self.calling_aet!r}"
            if rj.result == 0x02:  # rejected transient: busy
                raise TransientError(f"{self.name}: association rejected ({reason})")
            raise AssociationError(f"{self.name}: association rejected: {reason}{hint}")
        if assoc.is_aborted and getattr(assoc.acceptor, "primitive", None) is None:
            # pynetdicom marks a failed connection as aborted; no answer came at all.
            raise TransientError(f"{self.name}: no connection")
        if assoc.is_aborted:
            raise AssociationError(
                f"{self.name}: association aborted by the PACS (no accepted service: it may not "
                f"allow {self.calling_aet!r} this operation)"
            )
        raise TransientError(f"{self.name}: no connection")

    def _associate(self, contexts, ext_neg=None, handlers=None):
        return with_retries(
            lambda: self._associate_once(contexts, ext_neg, handlers),
            retries=self.retries,
            backoff_s=self.backoff_s,
            what=f"associate with {self.name}",
        )

    def _diagnose(self, op: str, verb: str):
        """An operation got no answer: tell a PACS that is down (retry later) from one that
        aborts our request (it does not allow our AE title): the latter still answers C-ECHO."""
        try:
            assoc = self._associate_once([(Verification, None)])
        except PacsError:
            raise TransientError(f"{self.name}: {op} got no answer") from None
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if not status:
            raise TransientError(f"{self.name}: {op} got no answer")
        error = MoveRefused if op == "C-MOVE" else AssociationError
        raise error(
            f"{self.name}: the PACS aborted our {op}; it does not allow AE title "
            f"{self.calling_aet!r} to {verb} (add it to the PACS's list of modalities)"
        )

    # -- C-FIND ---------------------------------------------------------------------------

    def _c_find(self, assoc, level: str, keys: dict[str, str], returns: list[str]) -> list:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for k in returns:
            setattr(ds, k, "")
        for k, v in keys.items():
            try:
                setattr(ds, k, v)
            except Exception as e:
                raise ValueError(f"--query {k}={v}: {e}") from None
        out = []
        for status, identifier in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            if not status:  # no response: the PACS went away, or refused us by aborting
                self._diagnose("C-FIND", "query")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                out.append(identifier)
            elif code != 0x0000:
                raise PacsError(
                    f"{self.name}: C-FIND at {level} level failed, {_status_text(status)}"
                )
        return out

    def _find_once(self, query: dict[str, str]) -> list[StudyRef]:
        study_q, series_q = split_query(query)
        if "Modality" in study_q:
            study_q["ModalitiesInStudy"] = study_q.pop("Modality")
        assoc = self._associate([(StudyRootQueryRetrieveInformationModelFind, None)])
        try:
            studies = []
            found = self._c_find(assoc, "STUDY", study_q, ["StudyInstanceUID"])
            for st in found:
                study = str(st.StudyInstanceUID)
                refs = []
                series_keys = {"StudyInstanceUID": study, **series_q}
                for se in self._c_find(assoc, "SERIES", series_keys, ["SeriesInstanceUID"]):
                    series = str(se.SeriesInstanceUID)
                    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
                    for im in self._c_find(assoc, "IMAGE", keys, ["SOPInstanceUID", "SOPClassUID"]):
                        refs.append(
                            InstanceRef(
                                study,
                                series,
                                str(im.SOPInstanceUID),
                                str(im.get("SOPClassUID", "")),
                            )
                        )
                if refs:
                    studies.append(StudyRef(study, refs))
            return studies
        finally:
            assoc.release()

    def find(self, query: dict[str, str]) -> list[StudyRef]:
        return with_retries(
            lambda: self._find_once(query),
            retries=self.retries,
            backoff_s=self.backoff_s,
            what=f"C-FIND on {self.name}",
        )

    def check(self) -> None:
        assoc = self._associate([(StudyRootQueryRetrieveInformationModelFind, None)])
        assoc.release()

    # -- retrieval ------------------------------------------------------------------------

    @staticmethod
    def _identifiers(study: StudyRef, wanted: list[InstanceRef]) -> list[Dataset]:
        """The whole study or series where every instance is wanted (fewer requests), else
        single instances: a resumed pull asks only for what it lacks."""
        wanted_by_series, all_by_series = {}, {}
        for ref in wanted:
            wanted_by_series.setdefault(ref.series, []).append(ref)
        for ref in study.instances:
            all_by_series.setdefault(ref.series, []).append(ref)
        if len(wanted) == len(study.instances):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = study.uid
            return [ds]
        out = []
        for series, refs in wanted_by_series.items():
            if len(refs) == len(all_by_series[series]):
                ds = Dataset()
                ds.QueryRetrieveLevel = "SERIES"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series
                out.append(ds)
                continue
            for ref in refs:
                ds = Dataset()
                ds.QueryRetrieveLevel = "IMAGE"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series
                ds.SOPInstanceUID = ref.sop
                out.append(ds)
        return out

    def _run_retrieve(self, send, identifiers, what: str) -> int:
        """Send each identifier; the number of failed sub-operations the PACS reported."""
        failed = 0
        for ds in identifiers:
            final = None
            for status, _ in send(ds):
                if not status:
                    self._diagnose(what, "retrieve")
                final = status
            code = int(final.Status) if final is not None else -1
            if code == MOVE_DESTINATION_UNKNOWN:
                raise MoveRefused(
                    f"{self.name}: the PACS does not know {self.calling_aet!r} as a C-MOVE "
                    "destination; add it (with our host and --scp-port) to the PACS's "
                    "modalities, or use --retrieve get"
                )
            if code in (0xA701, 0xA702):
                raise TransientError(f"{self.name}: {what} out of resources")
            if 0xC000 <= code <= 0xCFFF:
                raise PacsError(
                    f"{self.name}: {what} failed, {_status_text(final)}: the PACS could not "
                    "process it (e.g. an object our Storage SCP does not accept)"
                )
            if code not in (0x0000, 0xB000):
                raise PacsError(f"{self.name}: {what} failed, {_status_text(final)}")
            failed += int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
        return failed

    def _scp_for(self, sink: Sink) -> StorageSCP:
        with self._scp_lock:
            if self._scp is None:
                self._scp = StorageSCP(
                    self.calling_aet, self.scp_host, self.scp_port, self.called_aet, sink
                )
            return self._scp

    def _move(self, study, wanted, sink) -> int:
        self._scp_for(sink)  # listening before the PACS is asked to connect back
        assoc = self._associate([(StudyRootQueryRetrieveInformationModelMove, None)])
        try:
            return self._run_retrieve(
                lambda ds: assoc.send_c_move(
                    ds, self.calling_aet, StudyRootQueryRetrieveInformationModelMove
                ),
                self._identifiers(study, wanted),
                "C-MOVE",
            )
        finally:
            if assoc.is_established:
                assoc.release()

    def _get(self, study, wanted, sink) -> int:
        classes = sorted({r.sop_class for r in wanted if r.sop_class})
        if not classes:
            raise PacsError("C-GET needs the SOP classes, and C-FIND returned none")
        per_class = GET_SYNTAXES if len(classes) * len(GET_SYNTAXES) < MAX_CONTEXTS else None
        contexts = [(StudyRootQueryRetrieveInformationModelGet, None)]
        for c in classes:
            if per_class:
                contexts += [(UID(c), [ts]) for ts in per_class]
            else:
                contexts.append((UID(c), ALL_TRANSFER_SYNTAXES))
        if len(contexts) > MAX_CONTEXTS:
            raise PacsError(
                f"C-GET: a study with {len(classes)} SOP classes needs too many contexts"
            )
        roles = [build_role(UID(c), scp_role=True) for c in classes]

        def on_store(event):
            try:
                sink(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset())
            except Exception:
                return 0xA700
            return 0x0000

        assoc = self._associate(contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            return self._run_retrieve(
                lambda ds: assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet),
                self._identifiers(study, wanted),
                "C-GET",
            )
        finally:
            if assoc.is_established:
                assoc.release()

    def retrieve_study(self, study: StudyRef, wanted: list[InstanceRef], sink: Sink) -> str | None:
        """Retrieve the wanted instances of one study into the sink; a note on failures."""
        if self.retrieve_mode == "get" or self._move_refused:
            failed, op = self._get(study, wanted, sink), "C-GET"
        else:
            try:
                failed, op = self._move(study, wanted, sink), "C-MOVE"
            except MoveRefused:
                if self.retrieve_mode == "move":
                    raise
                self._move_refused = True  # remembered: one refusal is enough per pull
                failed, op = self._get(study, wanted, sink), "C-GET"
        if failed:
            return f"the PACS reported {failed} failed {op} sub-operations"
        return None

    def close(self) -> None:
        if self._scp is not None:
            self._scp.close()
            self._scp = None
