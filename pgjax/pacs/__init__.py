"""PACS ingestion: find studies on a PACS, retrieve their instances, preprocess them into a store.

source.py       what a PACS source is (studies, instances, errors, retries with back-off)
credentials.py  credentials from environment variables or a file, never the command line
dicomweb.py     QIDO-RS search and WADO-RS retrieval
dimse.py        C-FIND, C-MOVE to a Storage SCP of our own, C-GET
pull.py         staging, resume, progress, failed studies, then `pgjax preprocess`'s phases
"""
