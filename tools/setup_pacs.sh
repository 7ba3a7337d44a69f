#!/usr/bin/env bash
# Best effort: installs Orthanc (with its DICOMweb and GDCM plugins) for the PACS tests
# (tests/test_pacs.py), which skip with a reason where it is missing. Needs root and apt-get;
# never fails the set-up. The package's service is not started: apt's policy-rc.d or a
# container without init leaves it stopped, and the tests start their own Orthanc inside a
# private network namespace (Orthanc 1.10 listens on every interface).
set -uo pipefail
if [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup: not root or no apt-get; the PACS tests will skip (they need Orthanc)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package's service from starting during the install (exit 101: "not allowed"), unless
# the machine already has a policy of its own.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY"
  trap 'rm -f "$POLICY"' EXIT
fi
if ! apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb orthanc-gdcm \
    >/tmp/pgjax-setup-pacs.log 2>&1; then
  apt-get update -q >>/tmp/pgjax-setup-pacs.log 2>&1
  apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb orthanc-gdcm \
    >>/tmp/pgjax-setup-pacs.log 2>&1 ||
    echo "setup: Orthanc not installed (see /tmp/pgjax-setup-pacs.log); PACS tests will skip" >&2
fi
# Should a service manager have started the packaged Orthanc anyway: stop it.
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
  systemctl stop orthanc && systemctl disable orthanc >/dev/null 2>&1
elif command -v service >/dev/null; then
  service orthanc stop >/dev/null 2>&1 || true
fi
exit 0
