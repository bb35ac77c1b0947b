"""Settings of radflow's PACS side: how to reach a DICOMweb server (``dicomweb:``) and where
to publish reports back (``publish:``). No secret is ever a setting: only the names of the
environment variables that hold them."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core.errors import ConfigError

__all__ = ["DicomWebConfig", "PublishConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DicomWebConfig(_Strict):
    """Access to DICOMweb servers (PS3.18): the source PACS and the publish target."""

    auth: Literal["none", "basic", "bearer"] = Field(
        "none", description="HTTP authentication: none | basic (username/password) | bearer"
    )
    username_env: str | None = Field(
        None, min_length=1, description="environment variable holding the basic-auth user"
    )
    password_env: str | None = Field(
        None, min_length=1, description="environment variable holding the basic-auth password"
    )
    token_env: str | None = Field(
        None, min_length=1, description="environment variable holding the bearer token"
    )
    verify_tls: bool = Field(True, description="check the server's TLS certificate (https)")
    ca_bundle: str | None = Field(
        None, min_length=1, description="PEM file of the CA that signed the server's certificate"
    )
    timeout_seconds: float = Field(60.0, gt=0, le=900, description="connect and read timeout")
    max_attempts: int = Field(
        4, ge=1, le=20, description="attempts per request on 408/429/503/504 or a lost connection"
    )
    retry_wait_ms: int = Field(
        500, ge=1, le=60_000, description="first retry wait; doubles with each attempt"
    )
    page_size: int = Field(
        100, ge=1, le=10_000, description="studies per QIDO-RS search page (the URI's limit=)"
    )
    max_concurrency: int = Field(
        8, ge=1, le=64, description="metadata requests and instance retrievals in flight"
    )
    max_response_mib: int = Field(
        1024, ge=1, le=65_536, description="largest response accepted (a hostile server's guard)"
    )
    max_instances_per_study: int = Field(
        100_000, ge=1, le=10_000_000, description="instances a study's metadata may list"
    )

    @model_validator(mode="after")
    def _names_the_secrets(self) -> DicomWebConfig:
        if self.auth == "basic" and not (self.username_env and self.password_env):
            raise ValueError("auth: basic needs username_env and password_env")
        if self.auth == "bearer" and not self.token_env:
            raise ValueError("auth: bearer needs token_env")
        return self

    @property
    def secret_envs(self) -> list[str]:
        """The environment variables the credentials come from (named in HTTP 401 errors)."""
        if self.auth == "basic":
            return [self.username_env or "", self.password_env or ""]
        return [self.token_env or ""] if self.auth == "bearer" else []

    def credential(self, name: str | None) -> str:
        """The value of one credential variable; a ConfigError naming it when it is unset."""
        value = os.environ.get(name or "")
        if not value:
            raise ConfigError(
                f'environment variable "{name}" for dicomweb.auth: {self.auth} is not set',
                hint=f"export {name}=... (it is never logged or written)",
            )
        return value


class PublishConfig(_Strict):
    """Where each study's report.sr.dcm goes once its report is written."""

    dicomweb: str | None = Field(
        None,
        description="STOW-RS each SR to this DICOMweb root (dicomweb+http(s)://HOST:PORT/PATH), "
        "or `same` = the run's DICOMweb source; null = publish nothing",
    )
