"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) as its own process on a free
loopback port, for the tests and the PACS benchmark: DICOMweb plugin on, HTTP authentication
on, no DICOM port, a short StableAge, storage in a temporary folder."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simulator.process import free_port, serving

__all__ = ["ORTHANC", "DICOMWEB_PLUGIN", "OrthancProcess", "orthanc_missing", "running_orthanc"]

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class OrthancProcess:
    url: str  # http://127.0.0.1:PORT (its REST API)
    user: str
    password: str

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root as a radflow SOURCE."""
        return f"dicomweb+{self.url}/dicom-web"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here, or None (``make test`` installs the Debian packages)."""
    if shutil.which(ORTHANC) is None and not Path(ORTHANC).exists():
        return f"{ORTHANC} is missing (apt-get install orthanc orthanc-dicomweb)"
    if not Path(DICOMWEB_PLUGIN).exists():
        return f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return None


@contextlib.contextmanager
def running_orthanc(
    stable_age: int = 2, user: str = "radflow", password: str = "orthanc-test-password"
) -> Iterator[OrthancProcess]:
    """Start Orthanc with a generated config; wait until its REST API answers; stop it."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="radflow-orthanc-") as home:
        config = {
            "Name": "radflow-test",
            "HttpPort": port,
            "DicomServerEnabled": False,
            "DicomPort": 0,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {user: password},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
            "StableAge": stable_age,
            "StorageDirectory": f"{home}/db",
            "IndexDirectory": f"{home}/db",
            "HttpCompressionEnabled": False,
        }
        path = Path(home) / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        health = f"http://{user}:{password}@127.0.0.1:{port}/system"
        with serving([ORTHANC, str(path)], health, name="Orthanc", wait=60):
            yield OrthancProcess(f"http://127.0.0.1:{port}", user, password)
