"""A DICOMweb server (PS3.18) as radflow talks to it: the ``dicomweb+http(s)://`` URI with its
QIDO-RS filters, one ``dicomweb-client`` per server with the configured authentication, TLS,
retries, a bound on response sizes and a count of the bytes received, and HTTP failures turned
into one clear line naming the server and what to check."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests
from dicomweb_client import DICOMwebClient
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from tasks.core.errors import ConfigError, ObjectMissing, PacsError, RadflowError
from tasks.core.words import parse_bool
from tasks.pacs.settings import DicomWebConfig

__all__ = [
    "SCHEME",
    "DicomWebSource",
    "PacsClient",
    "is_dicomweb",
    "parse_dicomweb_uri",
]

logger = logging.getLogger(__name__)

SCHEME = "dicomweb+"
# A DICOM UID (PS3.5 9.1); checked before one becomes part of a URL path
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# query parameters of the URI that are QIDO-RS paging/matching options, not attribute filters
_OPTIONS = {"limit", "offset", "fuzzymatching"}
_RETRIED = frozenset({408, 429, 503, 504})  # what dicomweb-client retries by itself
_TRANSIENT = _RETRIED | {500, 502}


def is_dicomweb(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(("dicomweb+http://", "dicomweb+https://"))


@dataclass(frozen=True)
class DicomWebSource:
    """``dicomweb+http(s)://HOST:PORT/PATH[?FILTERS]`` taken apart.

    ``base_url`` is the DICOMweb root (``http(s)://HOST:PORT/PATH``); ``filters`` are QIDO-RS
    study matching keys by keyword (``StudyDate=20260101-20261231``, ``ModalitiesInStudy=CT``);
    ``limit`` is the search page size (QIDO-RS ``limit``: never one giant response)."""

    uri: str
    base_url: str
    filters: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    offset: int = 0
    fuzzymatching: bool | None = None

    @property
    def root_uri(self) -> str:
        """The URI without its query: the server, as ``publish: {dicomweb: same}`` means it."""
        return SCHEME + self.base_url


def _filter_keyword(name: str, uri: str) -> str:
    """A QIDO-RS matching key as a DICOM keyword, from a keyword or an 8-digit hex tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword or dictionary_VR(keyword) == "SQ":
        raise ConfigError(
            f'"{uri}": "{name}" is not a DICOM attribute to search studies by',
            hint="use keywords such as StudyDate, ModalitiesInStudy, StudyInstanceUID, "
            "AccessionNumber (PS3.18 10.6.1.2)",
        )
    return keyword


def parse_dicomweb_uri(uri: str) -> DicomWebSource:
    """Parse a ``dicomweb+http(s)://`` source; a ConfigError names what is wrong with it."""
    if not is_dicomweb(uri):
        raise ConfigError(f'"{uri}" is not a DICOMweb URI (dicomweb+http(s)://HOST:PORT/PATH)')
    parts = urlsplit(uri.removeprefix(SCHEME))
    if parts.username or parts.password:
        raise ConfigError(
            f"a DICOMweb URI must not hold credentials: {parts.scheme}://{parts.hostname}...",
            hint="name environment variables in dicomweb: {auth, username_env, password_env}",
        )
    if not parts.hostname:
        raise ConfigError(f'"{uri}" names no host')
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f'"{uri}" has an invalid port') from None
    if parts.fragment:
        raise ConfigError(f'"{uri}": a DICOMweb URI has no #fragment')
    netloc = parts.hostname + (f":{port}" if port else "")
    base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    filters: dict[str, str] = {}
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name.lower() in _OPTIONS:
            options[name.lower()] = value
        else:
            filters[_filter_keyword(name, uri)] = value
    try:
        limit = int(options["limit"]) if "limit" in options else None
        offset = int(options.get("offset", 0))
    except ValueError:
        raise ConfigError(f'"{uri}": limit and offset must be whole numbers') from None
    if (limit is not None and not 1 <= limit <= 10_000) or offset < 0:
        raise ConfigError(f'"{uri}": limit must be 1-10000 and offset >= 0')
    try:
        fuzzymatching = parse_bool(options.get("fuzzymatching"))
    except ValueError as exc:
        raise ConfigError(f'"{uri}": fuzzymatching {exc}') from None
    return DicomWebSource(
        uri=uri,
        base_url=base,
        filters=filters,
        limit=limit,
        offset=offset,
        fuzzymatching=fuzzymatching,
    )


class _TooLarge(Exception):
    """A response past ``dicomweb.max_response_mib`` (raised inside the response hook)."""


class PacsClient:
    """One DICOMweb server: a ``DICOMwebClient`` over a requests session carrying the auth,
    TLS and retry settings; ``received`` counts the body bytes of every response.

    Pickles as its URL and settings (a pool process makes its own session)."""

    def __init__(self, base_url: str, config: DicomWebConfig, retry: bool = True) -> None:
        self.base_url = base_url
        self.config = config
        self.retry = retry
        self.received = 0
        self.requests = 0
        self._lock = threading.Lock()
        session = requests.Session()
        if config.auth == "basic":
            session.auth = (
                config.credential(config.username_env),
                config.credential(config.password_env),
            )
        elif config.auth == "bearer":
            session.headers["Authorization"] = f"Bearer {config.credential(config.token_env)}"
        session.verify = config.ca_bundle or config.verify_tls
        pool = config.max_concurrency + 2
        adapter = requests.adapters.HTTPAdapter(pool_connections=pool, pool_maxsize=pool)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.hooks["response"].append(self._on_response)
        self.session = session
        self.web = DICOMwebClient(base_url, session=session, timeout=config.timeout_seconds)
        # dicomweb-client retries 408/429/503/504 and lost connections, waiting
        # retry_wait_ms, then twice as long each time
        self.web.set_http_retry_params(
            retry=retry and config.max_attempts > 1,
            max_attempts=config.max_attempts,
            wait_exponential_multiplier=config.retry_wait_ms,
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "config": self.config, "retry": self.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["base_url"], state["config"], state["retry"])

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """Read the body here, at most ``max_response_mib`` of it, counting the bytes."""
        limit = self.config.max_response_mib * 2**20
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise _TooLarge(f"{declared} bytes declared")
        body = bytearray()
        for chunk in response.iter_content(1 << 16):
            body += chunk
            if len(body) > limit:
                response.close()
                raise _TooLarge(f"more than {limit} bytes sent")
        response._content = bytes(body)  # what requests reads next (a stable attribute)
        with self._lock:
            self.received += len(body)
            self.requests += 1

    def call(self, what: str, url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with its failures as one radflow error naming ``url``."""
        try:
            return fn(*args, **kwargs)
        except RadflowError:
            raise
        except requests.HTTPError as exc:
            raise self.http_error(what, url, exc.response) from None
        except _TooLarge as exc:
            raise PacsError(
                f"{what} at {url}: the response is too large ({exc})",
                hint="raise dicomweb.max_response_mib if this server's studies are that large",
            ) from None
        except requests.exceptions.JSONDecodeError as exc:
            raise PacsError(f"{what} at {url}: the answer is not valid JSON ({exc})") from None
        except requests.RequestException as exc:
            error = PacsError(
                f"{what}: the PACS at {url} did not answer ({type(exc).__name__}: {exc})",
                hint="check that the server is up and the URL, port and TLS settings",
            )
            error.transient = True  # type: ignore[attr-defined]
            raise error from None
        except RecursionError:
            raise PacsError(f"{what} at {url}: the response is nested too deeply") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # invalid JSON, a malformed multipart body, a dataset dicomweb-client cannot parse
            raise PacsError(f"{what} at {url}: invalid response ({exc})") from None

    def get_json(self, what: str, url: str, params: dict[str, Any] | None = None) -> Any:
        """GET a JSON document (a server's own REST API, such as Orthanc's)."""

        def fetch() -> Any:
            answer = self.session.get(url, params=params, timeout=self.config.timeout_seconds)
            answer.raise_for_status()
            return answer.json()

        return self.call(what, url, fetch)

    def http_error(self, what: str, url: str, response: requests.Response | None) -> RadflowError:
        """One line for an HTTP error answer; ``.status`` and ``.transient`` (408, 429, 5xx:
        worth another try later) are set on it."""
        status = response.status_code if response is not None else 0
        error = self._http_error(what, url, status, response)
        error.status = status  # type: ignore[attr-defined]
        error.transient = status in _TRANSIENT  # type: ignore[attr-defined]
        return error

    def _http_error(
        self, what: str, url: str, status: int, response: requests.Response | None
    ) -> RadflowError:
        if status in (401, 403):
            if self.config.auth == "none":
                check = "the server wants credentials: set dicomweb.auth (basic or bearer)"
            else:
                check = f"check credentials in {' and '.join(self.config.secret_envs)}"
            return PacsError(f"{status} from PACS at {url}: {check}", hint="")
        if status == 404:
            return ObjectMissing(f"404 from PACS at {url}: not found ({what})")
        reason = response.reason if response is not None else ""
        retried = self.retry and status in _RETRIED and self.config.max_attempts > 1
        after = f" after {self.config.max_attempts} attempts" if retried else ""
        return PacsError(f"{status} {reason} from PACS at {url} ({what}){after}")
