"""Messages the agent publishes: the alert payload (DESIGN.md contract)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    version: str


class TopSensor(BaseModel):
    sensor: str
    share: float = Field(description="Share of the window's reconstruction error (0..1).")


class Fault(BaseModel):
    type: str
    confidence: float


class Alert(BaseModel):
    """One alert state change of one device. Delivered at least once: de-duplicate on ``id``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id: the same transition always gets the same id.")
    device: str
    state: Literal["raised", "cleared"]
    ts: str = Field(description="ISO 8601 UTC time of the row that triggered the transition.")
    score: float = Field(description="Smoothed score that crossed the threshold (or the clear level).")
    threshold: float
    model: ModelRef
    top_sensors: list[TopSensor]
    fault: Fault | None = None
    agent: str = Field(description="Agent that raised it (several gateways can watch one plant).")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_id(agent: str, device: str, state: str, ts_iso: str, model: ModelRef) -> str:
    """Deterministic: re-processing the same telemetry (broker redelivery after a crash)
    yields the same id, so consumers de-duplicate it too. Timestamps are strictly
    increasing per device, so two different transitions never share an id."""
    key = "\x1f".join((agent, device, state, ts_iso, model.name, model.version))
    return hashlib.sha256(key.encode()).hexdigest()[:32]
