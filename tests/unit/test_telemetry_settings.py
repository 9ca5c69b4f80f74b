"""Tracing settings: OpenTelemetry's own variables are honoured, ours win when both are set; traceparents kept in
job records are checked."""

from __future__ import annotations

import pytest

from libs.settings import SettingsError, TelemetrySettings
from libs.telemetry import checked_traceparent


def test_opentelemetry_variables_are_honoured_and_ours_win() -> None:
    otel = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    settings = TelemetrySettings.from_env(otel, "quota")
    assert (settings.exporter, settings.otlp_endpoint) == ("otlp", "http://collector:4317")
    traces_only = {**otel, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}
    assert TelemetrySettings.from_env(traces_only, "quota").otlp_endpoint == "http://traces:4317"
    ours = {**otel, "JOBMESH_OTEL_EXPORTER": "console", "JOBMESH_OTEL_ENDPOINT": "127.0.0.1:9999"}
    settings = TelemetrySettings.from_env(ours, "quota")
    assert (settings.exporter, settings.otlp_endpoint) == ("console", "127.0.0.1:9999")
    assert TelemetrySettings.from_env({}, "quota").exporter == "none"
    with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER"):
        TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": "zipkin"}, "quota")


@pytest.mark.parametrize(
    "value, kept",
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_only_a_well_formed_traceparent_is_kept(value: str, kept: bool) -> None:
    assert checked_traceparent(value) == (value if kept else "")
