"""One typed, frozen settings object for the whole daemon.

Built once in ``main.py`` from ``config/settings.toml`` (or ``--config PATH``)
plus ``SCALPER__SECTION__KEY`` environment variables, which win over the file.
Unknown keys, wrong types and out-of-range values are errors that name the key,
the value and the fix (``SettingsError``; the CLI exits 2). Broker credentials
come only from the environment and never appear in logs or the journal.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "SCALPER__"
ENV_DELIMITER = "__"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "settings.toml"

# Keys that may only come from the environment (CONVENTIONS.md): a secret in a
# file ends up in backups, screenshots and support tickets.
ENV_ONLY_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("broker", "login"),
        ("broker", "server"),
        ("broker", "password"),
        ("http", "token"),
        ("alerts", "webhook_url"),
    }
)

TIMEFRAME_SECONDS: dict[str, int] = {
    "M1": 60,
    "M5": 300,
    "M15": 900,
    "M30": 1800,
    "H1": 3600,
}


class SettingsError(ValueError):
    """Invalid configuration: the message names the key, the value and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BrokerSettings(_Section):
    kind: Literal["paper", "mt5", "mt5linux"] = "paper"
    host: str = "127.0.0.1"
    port: int = Field(18812, ge=1, le=65535)
    terminal_path: str = ""
    magic: int = Field(234000, ge=0, le=2**31 - 1)
    deviation_points: int = Field(10, ge=0, le=1000)
    server_timezone: str = "UTC"
    # Live feed: how often the terminal is asked for newly closed bars (seconds).
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    # Reconnect backoff doubles from 1 s up to this cap (seconds).
    reconnect_backoff_max_s: float = Field(60.0, ge=1, le=3600)
    # Environment only (SCALPER__BROKER__LOGIN / __SERVER / __PASSWORD).
    login: int | None = Field(None, repr=False)
    server: SecretStr | None = Field(None, repr=False)
    password: SecretStr | None = Field(None, repr=False)

    @field_validator("server_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        if value.startswith("NY+") or value.startswith("NY-"):
            offset = value[3:]
            if not offset.isdigit() or int(offset) > 12:
                raise ValueError("NY offset must be a whole number of hours 0..12, e.g. 'NY+7'")
            return value
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                "unknown time zone; use an IANA name such as 'Europe/Athens' or 'UTC', or 'NY+7'"
            ) from exc
        return value


class TradingSettings(_Section):
    symbols: tuple[str, ...] = ("EURUSD",)
    timeframe: Literal["M1", "M5", "M15", "M30", "H1"] = "M1"

    @field_validator("symbols")
    @classmethod
    def _symbols_nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one symbol is required")
        if len(set(value)) != len(value):
            raise ValueError("symbols must be unique")
        for symbol in value:
            if not symbol or not symbol.replace(".", "").replace("_", "").isalnum():
                raise ValueError(f"symbol {symbol!r} is not a broker symbol name")
        return value

    @property
    def timeframe_s(self) -> int:
        return TIMEFRAME_SECONDS[self.timeframe]


class SymbolSettings(_Section):
    """Contract specification the paper broker uses (MT5 reads it from the terminal)."""

    contract_size: float = Field(100_000.0, gt=0)
    point: float = Field(0.00001, gt=0)
    digits: int = Field(5, ge=0, le=10)
    volume_min: float = Field(0.01, gt=0)
    volume_step: float = Field(0.01, gt=0)
    volume_max: float = Field(50.0, gt=0)
    stops_level_points: int = Field(0, ge=0)
    # Used when a bar carries no spread (spread 0 in the data).
    default_spread_points: int = Field(10, ge=0)
    # Currency of price differences; P&L is converted into the account currency.
    profit_currency: str = "USD"
    base_currency: str = "EUR"

    @model_validator(mode="after")
    def _volumes_consistent(self) -> SymbolSettings:
        if self.volume_min > self.volume_max:
            raise ValueError(
                f"volume_min ({self.volume_min}) must not exceed volume_max ({self.volume_max})"
            )
        return self


def _default_symbols() -> dict[str, SymbolSettings]:
    return {
        "EURUSD": SymbolSettings(),
        "GBPUSD": SymbolSettings(base_currency="GBP", default_spread_points=14),
        "XAUUSD": SymbolSettings(
            contract_size=100.0,
            point=0.01,
            digits=2,
            default_spread_points=25,
            base_currency="XAU",
        ),
    }


class PaperSettings(_Section):
    data: str = "synthetic"
    synthetic_seed: int = Field(7, ge=0)
    synthetic_start: str = "2024-01-01T00:00:00Z"
    replay_bars_per_s: float = Field(100.0, ge=0)
    history_bars: int = Field(500, ge=0, le=1_000_000)
    initial_balance: float = Field(10_000.0, gt=0)
    account_currency: str = "USD"
    leverage: int = Field(100, ge=1, le=5000)
    slippage_points: int = Field(0, ge=0)
    commission_per_lot: float = Field(3.5, ge=0)

    @field_validator("synthetic_start")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        from datetime import datetime

        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("expected an ISO-8601 UTC time such as 2024-01-01T00:00:00Z") from exc
        if parsed.tzinfo is None:
            raise ValueError("the time needs a zone: end it with Z (UTC)")
        return value


class RiskSettings(_Section):
    risk_per_trade_pct: float = Field(0.5, gt=0, le=5)
    stop_atr_mult: float = Field(1.5, gt=0, le=50)
    take_profit_r: float = Field(1.5, gt=0, le=20)
    min_stop_points: int = Field(50, ge=1)
    max_positions_per_symbol: int = Field(1, ge=0, le=100)
    max_positions_total: int = Field(3, ge=0, le=1000)
    daily_loss_limit_pct: float = Field(3.0, gt=0, le=100)
    max_spread_points: int = Field(30, ge=0)
    session_start_hour_utc: int = Field(0, ge=0, le=23)
    session_end_hour_utc: int = Field(24, ge=1, le=24)
    kill_switch_path: str = "data/KILL"


class StrategySettings(_Section):
    min_confidence: float = Field(0.45, ge=0.34, le=1)
    max_holding_bars: int = Field(30, ge=1, le=100_000)
    close_on_opposite_signal: bool = True
    # None = decided by broker.kind: true for paper, false for mt5/mt5linux.
    trade_without_models: bool | None = None


class _KindSettings(_Section):
    enabled: bool = True
    # Weight in the ensemble when models.weight_by = "settings".
    weight: float = Field(1.0, ge=0, le=100)
    # Scheduled retrain of this kind, in market seconds (0 = only on triggers).
    retrain_every_s: int = Field(14_400, ge=0)

    def hyperparams(self) -> dict[str, object]:
        """Constructor arguments of the model kind (not enabled/weight/schedule)."""
        return self.model_dump(exclude={"enabled", "weight", "retrain_every_s"})


class RFSettings(_KindSettings):
    n_estimators: int = Field(60, ge=1, le=5000)
    max_depth: int = Field(8, ge=1, le=100)
    min_samples_leaf: int = Field(5, ge=1)


class XGBSettings(_KindSettings):
    n_estimators: int = Field(100, ge=1, le=10_000)
    max_depth: int = Field(4, ge=1, le=30)
    learning_rate: float = Field(0.2, gt=0, le=1)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)


class LSTMSettings(_KindSettings):
    retrain_every_s: int = Field(86_400, ge=0)
    architecture: Literal["lstm", "bilstm_attention"] = "lstm"
    seq_len: int = Field(30, ge=2, le=1000)
    hidden_size_1: int = Field(128, ge=1, le=2048)
    hidden_size_2: int = Field(64, ge=1, le=2048)
    max_steps: int = Field(130, ge=1, le=1_000_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1)
    max_train_seconds: float = Field(900.0, gt=0)


class MLPSettings(_KindSettings):
    hidden_1: int = Field(64, ge=1, le=4096)
    hidden_2: int = Field(32, ge=1, le=4096)
    hidden_3: int = Field(16, ge=1, le=4096)
    max_steps: int = Field(2000, ge=1, le=1_000_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1)
    max_train_seconds: float = Field(300.0, gt=0)


class ModelsSettings(_Section):
    max_model_age_s: int = Field(86_400, ge=60)
    retention: int = Field(5, ge=1, le=1000)
    # Bars the first models train on (sized so a fresh machine trades on models within
    # 2 minutes) and bars of later retrains.
    initial_train_bars: int = Field(20_000, ge=1_000, le=5_000_000)
    train_bars: int = Field(50_000, ge=1_000, le=5_000_000)
    horizon_bars: int = Field(5, ge=1, le=500)
    label_threshold_atr: float = Field(0.5, gt=0, le=20)
    seed: int = Field(0, ge=0)
    weight_by: Literal["equal", "settings", "validation"] = "equal"
    # A production model older than max_model_age_s is used at once and retrained in the
    # background; true = retrain before trading on it.
    retrain_first_when_stale: bool = False
    rf: RFSettings = RFSettings()
    xgb: XGBSettings = XGBSettings()
    lstm: LSTMSettings = LSTMSettings()
    mlp: MLPSettings = MLPSettings()

    def kind(self, name: str) -> _KindSettings:
        section: _KindSettings = getattr(self, name)
        return section

    @property
    def enabled_kinds(self) -> tuple[str, ...]:
        return tuple(k for k in ("rf", "xgb", "lstm", "mlp") if self.kind(k).enabled)


class ValidationSettings(_Section):
    """Gates every candidate must pass before it may shadow (ml/validation.py)."""

    # Holdout accuracy minus the majority-class rate must be at least this.
    min_accuracy_edge: float = Field(0.0, ge=-1, le=1)
    # Holdout log-loss at most this (ln 3 = 1.0986 is a uniform guess).
    max_log_loss: float = Field(1.0986, gt=0)
    # Against the production model on the same holdout: worse by at most these.
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    max_log_loss_increase: float = Field(0.01, ge=0)
    # Cost-aware simulated run on the holdout (spread + commission).
    min_trades: int = Field(30, ge=0)
    min_sharpe: float = -1.0
    max_drawdown_pct: float = Field(25.0, gt=0, le=100)
    min_win_rate: float = Field(0.0, ge=0, le=1)
    min_profit_factor: float = Field(0.0, ge=0)
    # The candidate's simulated net P&L must be at least the baseline predictor's.
    beat_baseline: bool = True
    # Single-row ONNX latency p99 (milliseconds).
    max_latency_p99_ms: float = Field(5.0, gt=0)


class AutotrainSettings(_Section):
    """The auto-trainer: schedule, triggers, shadow, rollback (ml/auto_trainer.py)."""

    enabled: bool = True
    # Live: how often the scheduler thread checks what is due (wall seconds).
    tick_s: float = Field(5.0, gt=0, le=3600)
    # A training job running longer than this is killed and recorded as failed.
    job_timeout_s: float = Field(1800.0, gt=0)
    # A due job that could not start within this many seconds is skipped to the next.
    misfire_grace_s: int = Field(300, ge=1)
    # Shadow: candidate vs production on live bars (scored once labels are known).
    shadow_min_bars: int = Field(300, ge=10)
    shadow_max_bars: int = Field(3000, ge=10)
    # Not-worse margin in mean log-loss and the one-sided test's significance level.
    shadow_margin: float = Field(0.02, ge=0)
    shadow_alpha: float = Field(0.05, gt=0, lt=0.5)
    # Fraction of position size that follows the shadow candidate (0 = no canary).
    canary_fraction: float = Field(0.0, ge=0, le=0.5)
    # After a promotion the previous model keeps predicting beside it; the same test
    # over this many scored bars rolls back a new model that is worse.
    rollback_min_bars: int = Field(300, ge=10)
    rollback_max_bars: int = Field(3000, ge=10)
    rollback_margin: float = Field(0.02, ge=0)
    # Emergency retrain: closed trades' win rate or drawdown since the last promotion.
    emergency_check_every_s: int = Field(900, ge=60)
    emergency_min_trades: int = Field(20, ge=1)
    emergency_min_win_rate: float = Field(0.25, ge=0, le=1)
    emergency_max_drawdown_pct: float = Field(5.0, gt=0, le=100)
    # Drift: per-feature KS + PSI of recent bars against the model's reference sample.
    drift_check_every_s: int = Field(3600, ge=60)
    drift_window_bars: int = Field(1000, ge=50)
    drift_alpha: float = Field(0.01, gt=0, lt=1)
    drift_psi_threshold: float = Field(0.25, gt=0)
    drift_min_share: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> AutotrainSettings:
        if self.shadow_max_bars < self.shadow_min_bars:
            raise ValueError("autotrain.shadow_max_bars must be >= autotrain.shadow_min_bars")
        if self.rollback_max_bars < self.rollback_min_bars:
            raise ValueError("autotrain.rollback_max_bars must be >= autotrain.rollback_min_bars")
        return self


class StorageSettings(_Section):
    journal_path: str = "data/journal.sqlite3"
    models_dir: str = "models"
    equity_snapshot_every_bars: int = Field(60, ge=1)
    # Prediction rows (one per model per bar) older than this, in market days, are
    # deleted once a market day; trades, orders and events are kept forever.
    predictions_keep_days: int = Field(90, ge=1, le=100_000)
    journal_batch_max: int = Field(500, ge=1, le=100_000)


class HttpSettings(_Section):
    # Read-only /health and /metrics; off unless asked for.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=1, le=65535)
    # Environment only (SCALPER__HTTP__TOKEN): when set, requests need
    # "Authorization: Bearer <token>".
    token: SecretStr | None = Field(None, repr=False)


class AlertsSettings(_Section):
    # Environment only (SCALPER__ALERTS__WEBHOOK_URL): Slack/Discord incoming webhooks and
    # Telegram bot URLs all carry their secret in the URL.
    webhook_url: SecretStr | None = Field(None, repr=False)
    # At most one webhook post per alert kind (and symbol) within this many seconds.
    min_interval_s: float = Field(300.0, ge=0, le=86_400)
    # Webhook request timeout, seconds; a failing webhook never affects trading.
    timeout_s: float = Field(5.0, gt=0, le=60)
    # Broker disconnected for longer than this many seconds raises an alert.
    broker_down_s: float = Field(300.0, ge=1, le=86_400)
    # Free space under the journal or model directory below this many MB raises an alert.
    disk_free_min_mb: float = Field(500.0, ge=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class _TomlDictSource(PydanticBaseSettingsSource):
    """Feeds the already-parsed TOML dict to pydantic-settings, below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading the mapping given to ``load_settings``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(_PENDING.environ, self.case_sensitive, self.env_ignore_empty)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
    )

    broker: BrokerSettings = BrokerSettings()
    trading: TradingSettings = TradingSettings()
    symbols: dict[str, SymbolSettings] = Field(default_factory=_default_symbols)
    paper: PaperSettings = PaperSettings()
    risk: RiskSettings = RiskSettings()
    strategy: StrategySettings = StrategySettings()
    models: ModelsSettings = ModelsSettings()
    validation: ValidationSettings = ValidationSettings()
    autotrain: AutotrainSettings = AutotrainSettings()
    storage: StorageSettings = StorageSettings()
    http: HttpSettings = HttpSettings()
    alerts: AlertsSettings = AlertsSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _MappingEnvSource(settings_cls),
            _TomlDictSource(settings_cls, _PENDING.toml),
        )

    @field_validator("symbols", mode="before")
    @classmethod
    def _merge_default_symbols(cls, value: Any) -> Any:
        # A [symbols.X] table replaces that one symbol's spec, not the built-in others.
        if isinstance(value, Mapping):
            return {**_default_symbols(), **value}
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.risk.session_start_hour_utc >= self.risk.session_end_hour_utc:
            raise ValueError(
                "risk.session_start_hour_utc must be before risk.session_end_hour_utc "
                f"(got {self.risk.session_start_hour_utc} and {self.risk.session_end_hour_utc})"
            )
        if self.broker.kind == "paper":
            missing = [s for s in self.trading.symbols if s not in self.symbols]
            if missing:
                raise ValueError(
                    f"trading.symbols {missing} have no [symbols.<NAME>] contract table; "
                    "add one (contract_size, point, digits, volumes) for the paper broker"
                )
            for name in self.trading.symbols:
                spec = self.symbols[name]
                if self.paper.account_currency not in (spec.profit_currency, spec.base_currency):
                    raise ValueError(
                        f"symbols.{name}: the paper broker converts P&L only when the account "
                        f"currency ({self.paper.account_currency}) is the profit or base currency "
                        f"(got {spec.base_currency}/{spec.profit_currency})"
                    )
        return self

    @property
    def trade_without_models(self) -> bool:
        value = self.strategy.trade_without_models
        return self.broker.kind == "paper" if value is None else value

    def public_dict(self) -> dict[str, Any]:
        """Everything safe to log or journal: the credentials are left out."""
        data = self.model_dump(mode="json")
        for section, key in ENV_ONLY_KEYS:
            data[section].pop(key, None)
        return data


class _Pending:
    """Hands the parsed file and environment to the sources during one load."""

    toml: Mapping[str, Any] = {}
    environ: Mapping[str, str] = {}


_PENDING = _Pending()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SettingsError(f"{path}: settings file not found; pass --config PATH") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read settings file ({exc})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc}); fix the syntax there") from exc


def _check_env_names(environ: Mapping[str, str]) -> None:
    """pydantic-settings ignores SCALPER__BROKR__KIND silently; we refuse it."""
    sections = set(Settings.model_fields)
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        section = parts[0]
        if section not in sections:
            raise SettingsError(
                f"environment {name}: unknown settings section {section!r}; "
                f"known sections are {', '.join(sorted(sections))}"
            )
        if section == "symbols":
            continue
        annotation = Settings.model_fields[section].annotation
        fields = getattr(annotation, "model_fields", {})
        if len(parts) < 2 or parts[1] not in fields:
            raise SettingsError(
                f"environment {name}: unknown key {'.'.join(parts)!r}; "
                f"{section} has {', '.join(sorted(fields))}"
            )


def _env_name(loc: tuple[str | int, ...]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _format_errors(exc: ValidationError, path: Path, environ: Mapping[str, str]) -> str:
    lines = []
    upper_env = {k.upper() for k in environ}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc)
        env_name = _env_name(loc)
        source = f"environment {env_name}" if env_name in upper_env else str(path)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif len(loc) == 1 and isinstance(err.get("input"), str | int | float):
            msg = (
                f"{key} is a section, not a value; write it as a table, e.g. "
                f'[{key}] with kind = "..." below it'
            )
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        if tuple(str(p) for p in loc[:2]) in ENV_ONLY_KEYS and got_text:
            got_text = " (the value is not shown: it is a secret)"
        lines.append(f"{source}: {key + ': ' if key else ''}{msg}{got_text}")
    return "\n".join(lines)


def _format_source_error(text: str, path: Path, environ: Mapping[str, str]) -> str:
    """pydantic-settings fails before validation on a non-JSON list/dict in a variable."""
    if "_MappingEnvSource" in text:
        field = text.split('field "', 1)[-1].split('"', 1)[0]
        names = sorted(n for n in environ if n.upper().startswith(f"{ENV_PREFIX}{field.upper()}"))
        return (
            f"environment {', '.join(names) or ENV_PREFIX + field.upper()}: not valid JSON; "
            "lists and tables are written as JSON, e.g. SCALPER__TRADING__SYMBOLS='[\"EURUSD\"]'"
        )
    return f"{path}: {text}"


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the file, apply the environment, validate; raise ``SettingsError`` on any problem."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    env = dict(os.environ if environ is None else environ)
    data = _read_toml(config_path)
    for section, key in sorted(ENV_ONLY_KEYS):
        if isinstance(data.get(section), dict) and key in data[section]:
            raise SettingsError(
                f"{config_path}: {section}.{key} must not be in a file; remove it and set "
                f"{_env_name((section, key))} in the environment instead"
            )
    _check_env_names(env)
    _PENDING.toml = data
    _PENDING.environ = env
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, config_path, env)) from None
    except ValueError as exc:
        raise SettingsError(_format_source_error(str(exc), config_path, env)) from None
    finally:
        _PENDING.toml = {}
        _PENDING.environ = {}


def settings_json(settings: Settings) -> str:
    return json.dumps(settings.public_dict(), sort_keys=True)
