"""Settings: defaults are safe, the environment overrides, bad input is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import DEFAULT_CONFIG_PATH, Settings, SettingsError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_file_loads_with_safe_paper_defaults() -> None:
    s = load_settings(DEFAULT_CONFIG_PATH, environ={})
    assert s.broker.kind == "paper"
    assert s.trade_without_models is True
    assert s.trading.symbols == ("EURUSD",)
    assert s.risk.risk_per_trade_pct == 0.5


def test_shipped_file_equals_code_defaults() -> None:
    # Every key in settings.toml documents its default: the file must not drift from the code.
    assert load_settings(DEFAULT_CONFIG_PATH, environ={}) == Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception, match="frozen"):
        s.risk.risk_per_trade_pct = 2.0  # type: ignore[misc]


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[risk]\nrisk_per_trade_pct = 1.0\n")
    s = load_settings(path, environ={"SCALPER__RISK__RISK_PER_TRADE_PCT": "0.25"})
    assert s.risk.risk_per_trade_pct == 0.25


def test_out_of_range_value_names_key_value_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, "[risk]\nrisk_per_trade_pct = -1\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    text = str(err.value)
    assert str(path) in text
    assert "risk.risk_per_trade_pct" in text
    assert "greater than 0" in text
    assert "-1" in text


def test_environment_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SCALPER__RISK__MAX_POSITIONS_TOTAL"):
        load_settings(write(tmp_path, ""), environ={"SCALPER__RISK__MAX_POSITIONS_TOTAL": "many"})


def test_unknown_key_in_known_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"risk\.max_lots: unknown key"):
        load_settings(write(tmp_path, "[risk]\nmax_lots = 3\n"), environ={})


def test_unknown_section_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="rsik"):
        load_settings(write(tmp_path, "[rsik]\nmax_lots = 3\n"), environ={})


def test_misspelled_environment_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SCALPER__BROKR__KIND"):
        load_settings(write(tmp_path, ""), environ={"SCALPER__BROKR__KIND": "mt5"})


def test_misspelled_environment_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SCALPER__BROKER__KINDD"):
        load_settings(write(tmp_path, ""), environ={"SCALPER__BROKER__KINDD": "mt5"})


def test_wrong_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"risk\.max_positions_total"):
        load_settings(write(tmp_path, '[risk]\nmax_positions_total = "three"\n'), environ={})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[risk\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(path, environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize("key", ["login", "server", "password"])
def test_credentials_in_the_file_are_refused(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f'[broker]\n{key} = "123"\n')
    with pytest.raises(SettingsError, match=f"SCALPER__BROKER__{key.upper()}"):
        load_settings(path, environ={})


def test_credentials_from_environment_never_appear_in_public_dict_or_repr(tmp_path: Path) -> None:
    env = {
        "SCALPER__BROKER__LOGIN": "5550123",
        "SCALPER__BROKER__SERVER": "Broker-Live7",
        "SCALPER__BROKER__PASSWORD": "hunter2-secret",
    }
    s = load_settings(write(tmp_path, ""), environ=env)
    assert s.broker.login == 5550123
    assert s.broker.password is not None
    assert s.broker.password.get_secret_value() == "hunter2-secret"
    dumped = str(s.public_dict()) + repr(s) + str(s)
    for secret in ("5550123", "Broker-Live7", "hunter2-secret"):
        assert secret not in dumped


def test_trade_without_models_defaults_depend_on_broker(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(path, environ={}).trade_without_models is True
    live = load_settings(path, environ={"SCALPER__BROKER__KIND": "mt5"})
    assert live.trade_without_models is False
    forced = load_settings(
        path,
        environ={"SCALPER__BROKER__KIND": "mt5", "SCALPER__STRATEGY__TRADE_WITHOUT_MODELS": "1"},
    )
    assert forced.trade_without_models is True


def test_symbol_without_contract_spec_is_refused_in_paper_mode(tmp_path: Path) -> None:
    path = write(tmp_path, '[trading]\nsymbols = ["EURUSD", "USDCHF"]\n')
    with pytest.raises(SettingsError, match="USDCHF"):
        load_settings(path, environ={})


def test_symbol_table_overrides_one_symbol_and_keeps_builtin_others(tmp_path: Path) -> None:
    path = write(tmp_path, "[symbols.EURUSD]\ndefault_spread_points = 3\n")
    s = load_settings(path, environ={})
    assert s.symbols["EURUSD"].default_spread_points == 3
    assert s.symbols["XAUUSD"].contract_size == 100.0


def test_session_window_must_be_ordered(tmp_path: Path) -> None:
    path = write(tmp_path, "[risk]\nsession_start_hour_utc = 20\nsession_end_hour_utc = 8\n")
    with pytest.raises(SettingsError, match="session_start_hour_utc"):
        load_settings(path, environ={})


def test_bad_server_timezone_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="server_timezone"):
        load_settings(write(tmp_path, '[broker]\nserver_timezone = "Mars/Base"\n'), environ={})
    ok = load_settings(write(tmp_path, '[broker]\nserver_timezone = "NY+7"\n'), environ={})
    assert ok.broker.server_timezone == "NY+7"
