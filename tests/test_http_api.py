"""/health and /metrics over real HTTP on port 0; the readiness rule; the metrics."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from structlog.testing import capture_logs

from config.settings import HttpSettings
from utils.http_api import (
    HealthState,
    HttpServer,
    HttpServerError,
    ModelRow,
    ServiceMetrics,
    evaluate_health,
)

TOKEN = "tok-3f9a8c1d2e7b6a5f"  # noqa: S105 (a fake token the logs must not show)
NOW = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)


def _healthy(**overrides: Any) -> HealthState:
    args: dict[str, Any] = {
        "journal_open": True,
        "broker_connected": True,
        "feed_connected": True,
        "feed_last_bar_age_s": 12.0,
        "feed_stale_after_s": 180.0,
        "serving": {"EURUSD": {"baseline": "1.0.0"}},
        "symbols": ["EURUSD"],
        "now": NOW,
    }
    args.update(overrides)
    return evaluate_health(**args)


class _Mono:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(
    url: str, *, token: str | None = None, method: str = "GET", scheme: str = "Bearer"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 (local test server)
    if token is not None:
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def mono() -> _Mono:
    return _Mono()


@pytest.fixture
def server(mono: _Mono) -> Iterator[HttpServer]:
    api = HttpServer(metrics=ServiceMetrics(), port=0, monotonic=mono)
    api.start()
    try:
        yield api
    finally:
        api.stop()


def _url(api: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{api.port}{path}"


# -- the readiness rule -------------------------------------------------------------------


def test_healthy_on_the_baseline_says_which_set_serves() -> None:
    state = _healthy()
    assert state.ok and state.reasons == ()
    assert state.serving_set == "baseline"
    assert state.models_loaded == 0
    assert dict(state.serving["EURUSD"]) == {"baseline": "1.0.0"}


def test_models_and_mixed_sets_are_named() -> None:
    models = {"EURUSD": {"rf": "20240102T0900-ab12", "xgb": "20240102T0905-cd34"}}
    assert _healthy(serving=models).serving_set == "models"
    assert _healthy(serving=models).models_loaded == 2
    mixed = {**models, "XAUUSD": {"baseline": "1.0.0"}}
    state = _healthy(serving=mixed, symbols=["EURUSD", "XAUUSD"])
    assert state.ok and state.serving_set == "mixed"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"journal_open": False}, "journal is not open"),
        ({"broker_connected": False}, "broker is not connected"),
        ({"feed_connected": False}, "feed is not connected"),
        ({"feed_last_bar_age_s": 400.0}, "feed is stale: last bar 400 s ago (limit 180 s)"),
        ({"serving": {}}, "no predictor set loaded for EURUSD"),
        ({"serving": {"EURUSD": {}}}, "no predictor set loaded for EURUSD"),
        ({"symbols": ["EURUSD", "GBPUSD"]}, "no predictor set loaded for GBPUSD"),
    ],
)
def test_each_failed_condition_is_a_reason(overrides: dict[str, Any], reason: str) -> None:
    state = _healthy(**overrides)
    assert not state.ok
    assert state.reasons == (reason,)


def test_freshness_check_can_be_skipped_and_all_reasons_are_listed() -> None:
    assert _healthy(feed_last_bar_age_s=10_000.0, feed_stale_after_s=None).ok
    state = _healthy(journal_open=False, broker_connected=False, serving={})
    assert len(state.reasons) == 3 and state.serving_set == "none"


def test_health_state_is_immutable() -> None:
    state = _healthy()
    with pytest.raises(AttributeError):
        state.ok = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        state.serving["EURUSD"]["rf"] = "x"  # type: ignore[index]


# -- /health ------------------------------------------------------------------------------


def test_health_is_503_until_the_loop_publishes(server: HttpServer) -> None:
    status, headers, body = _request(_url(server, "/health"))
    assert status == 503
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["reasons"] == ["starting"]


def test_health_ok_is_200_with_the_serving_set(server: HttpServer) -> None:
    server.publish(_healthy())
    status, _, body = _request(_url(server, "/health"))
    data = json.loads(body)
    assert status == 200
    assert data["status"] == "ok" and data["ok"] is True and data["reasons"] == []
    assert data["serving_set"] == "baseline"
    assert data["serving"] == {"EURUSD": {"baseline": "1.0.0"}}
    assert data["feed_last_bar_age_s"] == 12.0
    assert data["checked_at"] == "2024-01-02T09:00:00Z"


def test_unhealthy_is_503_with_reasons(server: HttpServer) -> None:
    server.publish(_healthy(broker_connected=False))
    status, _, body = _request(_url(server, "/health"))
    data = json.loads(body)
    assert status == 503
    assert data["status"] == "unhealthy"
    assert data["reasons"] == ["broker is not connected"]


def test_a_snapshot_the_loop_stopped_refreshing_turns_503(server: HttpServer, mono: _Mono) -> None:
    server.publish(_healthy())
    mono.now += 10
    assert _request(_url(server, "/health"))[0] == 200
    mono.now += 10  # 20 s without a publish: over the 15 s default
    status, _, body = _request(_url(server, "/health"))
    assert status == 503
    assert json.loads(body)["reasons"] == ["health not refreshed for 20 s (event loop stalled?)"]


def test_head_answers_without_a_body(server: HttpServer) -> None:
    server.publish(_healthy())
    status, headers, body = _request(_url(server, "/health"), method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) > 0


# -- /metrics -----------------------------------------------------------------------------


def _samples(body: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    for sample_labels, value in samples[name]:
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    raise AssertionError(f"{name}{labels} not in {samples.get(name)}")


def test_metrics_parse_and_carry_every_series(server: HttpServer) -> None:
    metrics = server.metrics
    metrics.observe_decision(0.00012)
    metrics.observe_decision(0.003)
    metrics.bar("EURUSD")
    metrics.bar("EURUSD")
    metrics.bar("XAUUSD")
    metrics.order("DONE")
    metrics.order("REJECT")
    metrics.set_account(balance=10_000.0, equity=10_012.5, open_positions=2)
    metrics.set_models(
        [
            ModelRow("EURUSD", "rf", "v1", "production", age_s=3600.0),
            ModelRow("EURUSD", "baseline", "1.0.0", "baseline"),
        ]
    )
    metrics.training_run("promoted")
    metrics.training_run("failed")
    metrics.drift_alarm("EURUSD")
    metrics.alert("broker_down")
    metrics.loop_lag(0.004)
    server.publish(_healthy())

    status, headers, body = _request(_url(server, "/metrics"))
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    s = _samples(body)
    assert _value(s, "scalper_decision_latency_seconds_count") == 2
    assert _value(s, "scalper_decision_latency_seconds_bucket", le="0.0002") == 1
    assert _value(s, "scalper_decision_latency_seconds_bucket", le="5e-05") == 0
    assert _value(s, "scalper_bars_processed_total", symbol="EURUSD") == 2
    assert _value(s, "scalper_bars_processed_total", symbol="XAUUSD") == 1
    assert _value(s, "scalper_orders_total", result="DONE") == 1
    assert _value(s, "scalper_orders_total", result="REJECT") == 1
    assert _value(s, "scalper_open_positions") == 2
    assert _value(s, "scalper_account_balance") == 10_000.0
    assert _value(s, "scalper_account_equity") == 10_012.5
    assert (
        _value(
            s, "scalper_model_info", symbol="EURUSD", kind="rf", version="v1", stage="production"
        )
        == 1
    )
    assert _value(s, "scalper_model_age_seconds", symbol="EURUSD", kind="rf") == 3600.0
    assert _value(s, "scalper_training_runs_total", outcome="promoted") == 1
    assert _value(s, "scalper_training_runs_total", outcome="failed") == 1
    assert _value(s, "scalper_drift_alarms_total", symbol="EURUSD") == 1
    assert _value(s, "scalper_alerts_total", kind="broker_down") == 1
    assert _value(s, "scalper_event_loop_lag_seconds_count") == 1
    assert _value(s, "scalper_event_loop_lag_last_seconds") == 0.004
    assert _value(s, "scalper_ready") == 1
    assert _value(s, "scalper_broker_connected") == 1
    assert _value(s, "scalper_feed_last_bar_age_seconds") == 12.0


def test_set_models_drops_series_of_models_no_longer_served() -> None:
    metrics = ServiceMetrics(process_metrics=False)
    metrics.set_models([ModelRow("EURUSD", "rf", "v1", "production", age_s=10.0)])
    metrics.set_models([ModelRow("EURUSD", "rf", "v2", "production", age_s=1.0)])
    s = _samples(metrics.render())
    assert [labels["version"] for labels, _ in s["scalper_model_info"]] == ["v2"]
    assert _value(s, "scalper_model_age_seconds", kind="rf") == 1.0
    metrics.set_models([])
    s = _samples(metrics.render())
    assert "scalper_model_info" not in s and "scalper_model_age_seconds" not in s


def test_two_instances_do_not_share_a_registry() -> None:
    a, b = ServiceMetrics(process_metrics=False), ServiceMetrics(process_metrics=False)
    a.bar("EURUSD")
    assert "scalper_bars_processed_total" not in _samples(b.render())


# -- auth, routing, lifecycle -------------------------------------------------------------


@pytest.fixture
def secured(mono: _Mono) -> Iterator[HttpServer]:
    settings = HttpSettings(port=8787, token=SecretStr(TOKEN))
    api = HttpServer.from_settings(settings, ServiceMetrics(), port=0, monotonic=mono)
    api.start()
    try:
        yield api
    finally:
        api.stop()


def test_token_is_required_and_accepted(secured: HttpServer) -> None:
    secured.publish(_healthy())
    with capture_logs() as logs:
        for path in ("/health", "/metrics", "/nope"):
            status, headers, body = _request(_url(secured, path))
            assert status == 401
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert _request(_url(secured, path), token="wrong")[0] == 401  # noqa: S106
        assert _request(_url(secured, "/health"), token=TOKEN, scheme="Basic")[0] == 401
        status, _, body = _request(_url(secured, "/health"), token=TOKEN)
        assert status == 200
        assert _request(_url(secured, "/metrics"), token=TOKEN)[0] == 200
        assert _request(_url(secured, "/nope"), token=TOKEN)[0] == 404
    assert TOKEN not in repr(secured)
    assert TOKEN not in body.decode("utf-8")
    assert TOKEN not in json.dumps(logs, default=str)
    requests = [e for e in logs if e["event"] == "http_request"]
    assert requests and all(e["log_level"] == "debug" for e in requests)


def test_unknown_paths_are_404_and_writes_405(server: HttpServer) -> None:
    for path in ("/", "/healthz", "/metrics/x", "/../etc/passwd"):
        assert _request(_url(server, path))[0] == 404
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = _request(_url(server, "/health"), method=method)
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"


def test_request_logging_stays_off_stderr(
    server: HttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _request(_url(server, "/health"))
    _request(_url(server, "/missing"))
    # A client that connects and hangs up without a request.
    with socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass
    _request(_url(server, "/health"))
    assert capsys.readouterr().err == ""


def test_stop_closes_the_socket_and_the_thread() -> None:
    api = HttpServer(metrics=ServiceMetrics(process_metrics=False), port=0)
    api.start()
    port = api.port
    assert port != 0 and api.running
    assert _request(f"http://127.0.0.1:{port}/health")[0] == 503
    api.stop()
    assert not api.running
    assert not [t for t in threading.enumerate() if t.name == "http-api"]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    api.stop()  # idempotent


def test_a_busy_port_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api = HttpServer(metrics=ServiceMetrics(process_metrics=False), port=taken.getsockname()[1])
        with pytest.raises(HttpServerError, match=r"http\.port"):
            api.start()
    assert not api.running


def test_an_empty_token_is_refused_not_treated_as_no_auth() -> None:
    settings = HttpSettings(token=SecretStr(""))
    with pytest.raises(HttpServerError, match="SCALPER__HTTP__TOKEN"):
        HttpServer.from_settings(settings, ServiceMetrics(process_metrics=False), port=0)
