"""The API service's one settings object (env prefix DOSEWATCH_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from services.common.settings import CommonSettings


class ApiSettings(CommonSettings):
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    source: str = "dosewatch/api"

    # -- credentials --------------------------------------------------------------------------
    # API keys live in PostgreSQL (`dosewatch keys`). Bearer JWTs are accepted when a shared
    # secret (HS256) or a JWKS URL (RS256/ES256) is configured; the role and, for MDTs, the
    # unit come from these claims.
    jwt_secret: SecretStr | None = None
    jwt_secret_file: Path | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_role_claim: str = "role"
    jwt_unit_claim: str = "unit_id"
    key_cache_s: float = Field(5.0, ge=0, description="a revoked key stops working within this")

    # -- input limits -------------------------------------------------------------------------
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_zone_vertices: int = Field(5000, ge=4)
    max_page: int = Field(1000, ge=1)
    # Polling endpoints (MDTs): a token bucket per credential.
    poll_rate_per_s: float = Field(2.0, gt=0)
    poll_burst: int = Field(20, ge=1)

    # -- websockets ---------------------------------------------------------------------------
    # Changes are coalesced into ticks: one frame per client per tick, whatever the load.
    tick_ms: int = Field(50, ge=5)
    heartbeat_s: float = Field(15.0, gt=0)
    # Changes kept for clients that resume with their last sequence number; older -> snapshot.
    resume_buffer: int = Field(50_000, ge=100)
    # A client whose frame has not gone out within this is conflated (or, for audit, dropped).
    send_timeout_s: float = Field(10.0, gt=0)
    nearest_due: int = Field(5, ge=0, le=50)
    # A unit silent this long leaves the map and the MDT view.
    fix_ttl_s: float = Field(1800.0, gt=0)

    # -- console ------------------------------------------------------------------------------
    # An XYZ tile URL for the console's basemap, e.g. https://tile.example.org/{z}/{x}/{y}.png;
    # none: a plain background (the console needs no internet).
    basemap_url: str | None = None
    basemap_attribution: str = ""

    @model_validator(mode="after")
    def _jwt_secret_from_file(self) -> ApiSettings:
        if self.jwt_secret_file is not None:
            self.jwt_secret = SecretStr(self.jwt_secret_file.read_text().strip())
        return self
