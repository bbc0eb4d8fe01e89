"""Settings for the replay command (and the rules every service shares), env prefix DOSEWATCH_."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.dosage.core.params import DosageParams
from services.dosage.core.periods import ShiftCalendar, parse_shift_starts


class ReplaySettings(BaseSettings):
    """Precedence: command-line flags, then the --config file, then DOSEWATCH_* variables.

    Rule parameters nest under `dosage`: DOSEWATCH_DOSAGE__EXIT_BUFFER_M=30, or `[dosage]` in TOML.
    """

    model_config = SettingsConfigDict(
        env_prefix="DOSEWATCH_", env_nested_delimiter="__", extra="forbid"
    )

    dosage: DosageParams = Field(default_factory=DosageParams)
    tz: str = "UTC"
    shifts: str = "07:00,15:00,23:00"
    batch_size: int = Field(8192, ge=1, le=1_000_000)
    source: str = "urn:dosewatch:replay"

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {v!r}") from None
        return v

    @field_validator("shifts")
    @classmethod
    def _shifts(cls, v: str) -> str:
        parse_shift_starts(v)
        return v

    def calendar(self) -> ShiftCalendar:
        return ShiftCalendar(self.tz, parse_shift_starts(self.shifts))


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML or JSON file with the same keys as the settings."""
    text = path.read_bytes()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = tomllib.loads(text.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the config file must hold a table/object of settings")
    return data
