"""The one settings object every process reads.

Values come from `RECSYS_*` environment variables (read here and nowhere else), then CLI flags
override them through `load(**overrides)`. Validation happens before any network I/O; a bad value
becomes one line naming the variable, the value and what is allowed (`SettingsError`).

Every field's description is its documentation: README's configuration table is generated from it
(`recsys config --markdown`).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RECSYS_"


class SettingsError(ValueError):
    """A setting has a value that is not allowed; str() is the one line to show the user."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    # --- Kafka ------------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers, comma-separated host:port.",
    )
    topic_partitions: int = Field(
        2,
        ge=1,
        le=1024,
        description="Partitions of the keyed topics `recsys topics create` makes (sales, "
        "recommendations, graph-edges); single-partition topics (sales.dlq, model-ready) stay 1.",
    )
    topic_replication: int = Field(
        1, ge=1, le=16, description="Replication factor for created topics (3 on a cluster)."
    )
    # --- local state --------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("var"),
        description="Local state: broker data, checkpoints, store, models, logs. "
        "Deleting it resets the local system.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of every process."
    )
    # --- local broker ---------------------------------------------------------------------------
    broker_heap_mb: int = Field(
        512, ge=256, le=16384, description="Heap of the local broker started by `recsys broker`."
    )
    # --- producer -------------------------------------------------------------------------------
    producer_batch_kb: int = Field(
        512, ge=16, le=16384, description="Producer batch size in KiB (linger and batching)."
    )
    producer_linger_ms: int = Field(20, ge=0, le=10000, description="Producer linger in ms.")
    # --- Spark ----------------------------------------------------------------------------------
    spark_master: str = Field(
        "local[2]", description="Spark master URL (`local[2]`, `spark://host:7077`)."
    )
    spark_shuffle_partitions: int = Field(
        4, ge=1, le=10000, description="spark.sql.shuffle.partitions."
    )
    spark_driver_memory: str = Field(
        "4g", pattern=r"^\d+[mg]$", description="Driver memory (local mode: all of Spark)."
    )
    store_path: str = Field(
        "",
        description="Parquet store of accumulated sales (any Hadoop path: file:, hdfs:, s3a:). "
        "Empty means `<data_dir>/store`.",
    )
    checkpoint_path: str = Field(
        "",
        description="Checkpoint folder of the streaming query. Empty means "
        "`<data_dir>/checkpoints`.",
    )
    trigger_seconds: float = Field(
        5.0, gt=0, le=3600, description="Micro-batch interval of `recsys stream`, seconds."
    )
    # Big batches: each micro-batch pays a fixed cost (a few Spark jobs, planning, a store scan
    # for the dedupe) whatever its size, and 500,000 decoded records cache in ~100 MB.
    max_offsets_per_trigger: int = Field(
        500_000, ge=1, description="Most Kafka records one micro-batch reads."
    )
    # --- training -------------------------------------------------------------------------------
    train_threshold: int = Field(
        100_000,
        ge=1,
        description="New valid events accumulated since the last model that trigger training.",
    )
    train_max_wait_seconds: float = Field(
        0,
        ge=0,
        description="Train anyway when this many seconds passed since the last model and "
        "at least one new event arrived (0: off).",
    )
    warm_up: bool = Field(
        True,
        description="`recsys stream`: once half the threshold (or of the max wait) is reached, "
        "run one throw-away training cycle on synthetic events, so the first real one finds "
        "Spark's generated code and the JIT warm (spark/warmup.py).",
    )
    split: Literal["time", "random"] = Field(
        "time", description="Train/test split: chronological or seeded random."
    )
    split_cutoff: datetime | None = Field(
        None,
        description="ISO time: train before, test from it (time split). Unset: cut before the "
        "latest `test_fraction` of events.",
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of events in the test split when no cutoff is set."
    )
    als_mode: Literal["implicit", "explicit"] = Field(
        "implicit",
        description="implicit: quantities are confidence; explicit: the quantity is a rating.",
    )
    als_rank: int = Field(
        32,
        ge=1,
        le=1000,
        description="ALS latent factors (32: the precision@10 of 64 on the bundled data, in a "
        "third of the fit time).",
    )
    als_max_iter: int = Field(15, ge=1, le=200, description="ALS iterations.")
    als_reg_param: float = Field(0.1, ge=0, description="ALS regularization (lambda).")
    als_alpha: float = Field(10.0, gt=0, description="ALS implicit confidence scale.")
    confidence: Literal["log1p", "raw", "binary"] = Field(
        "log1p", description="Interaction strength from net quantity."
    )
    tune_before_train: bool = Field(
        False,
        description="`recsys train` and `recsys stream`: choose rank, reg and alpha with `recsys "
        "tune`'s grid search (on the train side only) before every model; model-ready's params "
        "carry the chosen ones.",
    )
    tune_ranks: Annotated[list[int], NoDecode] = Field(
        [8, 16, 32], min_length=1, description="Ranks `recsys tune` tries (comma-separated)."
    )
    tune_reg_params: Annotated[list[float], NoDecode] = Field(
        [0.01, 0.1, 1.0], min_length=1,
        description="Regularizations `recsys tune` tries (comma-separated).",
    )
    tune_alphas: Annotated[list[float], NoDecode] = Field(
        [1.0, 10.0, 40.0], min_length=1,
        description="Implicit confidence scales `recsys tune` tries (comma-separated; explicit "
        "mode has no alpha).",
    )
    seed: int = Field(42, description="Seed for ALS, random split and generators.")
    top_n: int = Field(10, ge=1, le=1000, description="Recommendations per user.")
    eval_k: int = Field(10, ge=1, le=1000, description="k of precision/recall/NDCG/MAP@k.")
    filter_bought: bool = Field(
        True, description="Leave products the user already bought out of recommendations."
    )
    non_product_pattern: str = Field(
        r"^(POST|DOT|M|m|D|C2|CRUK|BANK CHARGES|AMAZONFEE|S|B|PADS|ADJUST\d*|TEST\d+|gift_.*)$",
        description="Regular expression of product codes that are not products (postage, manual "
        "adjustments, discounts, carriage, bank and marketplace fees, samples, donations): kept in "
        "the store as the shop recorded them, left out of training, lists, the graph and the "
        "speed layer. The default fits the bundled data; empty: every code is a product.",
    )
    promote_gate: bool = Field(
        True,
        description="Put a new model in service only when its precision@k on its own test window "
        "beats popularity's and reaches (1 - promote_tolerance) x the serving model's on the same "
        "window; a rejected one's lists go to recommendations-shadow. Off: every model serves.",
    )
    promote_tolerance: float = Field(
        0.05, ge=0, le=1,
        description="How much worse than the serving model a new one may be and still replace it "
        "(a share of the champion's precision@k).",
    )
    models_path: str = Field(
        "", description="Saved models. Empty means `<data_dir>/models`."
    )
    export_dir: Path = Field(
        Path("exports"), description="Graph exports, one folder per model version."
    )
    # --- aggregator (`recsys aggregate`, Faust) ---------------------------------------------------
    aggregate_web_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the aggregator's read API listens on (0.0.0.0 in a container).",
    )
    aggregate_web_port: int = Field(
        6066, ge=1, le=65535, description="Port of the aggregator's read API (/stats, /ready, ...)."
    )
    aggregate_keep_models: int = Field(
        3,
        ge=1,
        le=100,
        description="Model versions whose per-user recommendations the aggregator keeps (for "
        "per-version stats and for matching a sale to the list in force when it arrived).",
    )
    feedback_horizon_seconds: int = Field(
        900,
        ge=60,
        le=7 * 24 * 3600,
        description="Window of the online feedback (hit-rate, precision@k), seconds of arrival "
        "time, rounded up to whole minutes. Sales older than this behind the newest arrival are "
        "folded into totals and no longer deduplicated by event_id.",
    )
    feedback_interval_seconds: float = Field(
        10.0, gt=0, le=3600, description="How often the aggregator publishes `feedback`, seconds."
    )
    feedback_retrain_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Retrain early when a model's online precision@k falls below this share of "
        "its offline precision@k (from `feedback`); 0 is off.",
    )
    # --- speed layer (`recsys speed`) -----------------------------------------------------------
    speed_max_batch: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="Most sales the speed layer folds in per batch (it takes what the client has "
        "fetched, never waits for more); each touched user is solved once per batch.",
    )
    speed_commit_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How often the speed layer writes the states of the users it touched to "
        "speed-state and commits its input offsets (0: after every batch). Lists go out at once "
        "whatever this is; a crash replays at most this much of `sales`, counted once.",
    )
    # --- dashboard ------------------------------------------------------------------------------
    dashboard_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address `recsys dashboard` listens on (0.0.0.0 in a container).",
    )
    dashboard_port: int = Field(
        5006, ge=1, le=65535, description="Port of `recsys dashboard` (Bokeh server)."
    )
    dashboard_allow_websocket_origin: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated host[:port] origins browsers may open the dashboard from "
        "(Bokeh's --allow-websocket-origin). Empty: localhost and 127.0.0.1 at the port.",
    )
    # --- training path ---------------------------------------------------------------------------
    train_path: Literal["auto", "driver", "distributed"] = Field(
        "auto",
        description="Where a training cycle prepares, evaluates, recommends and explains: "
        "driver (numpy on the Spark driver, fewer Spark jobs), distributed (Spark jobs only, "
        "nothing big on the driver) or auto (driver up to `RECSYS_TRAIN_DRIVER_MAX_EVENTS` "
        "events, distributed above). ALS.fit runs in Spark on both; decided once per cycle.",
    )
    train_driver_max_events: int = Field(
        20_000_000,
        ge=0,
        description="Largest cycle (sales events) `train_path=auto` runs on the driver path: "
        "the largest size `bench scale` measured, the driver path being the faster at every "
        "size up to it on one machine; on a cluster, measure there.",
    )
    # --- Security ---------------------------------------------------------------------------------
    broker_secure: bool = Field(
        False,
        description="`recsys broker start` (and `up`, `demo`) runs the local broker secured: "
        "one SASL_SSL port (a CA and certificate made on first start), a SCRAM-SHA-512 user "
        "and least-privilege ACLs per role, no plaintext port. Processes the launchers start "
        "use their role's user; other commands, unless configured below, the local `admin`.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = (
        Field(
            None,
            description="How clients connect: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL. "
            "Empty: PLAINTEXT, or with `RECSYS_BROKER_SECURE=true` SASL_SSL as the local "
            "broker's `admin`.",
        )
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols)."
    )
    kafka_sasl_username: str = Field("", description="SASL user (SASL_* protocols).")
    kafka_sasl_password: SecretStr = Field(
        SecretStr(""),
        description="SASL password; never printed (`recsys config` shows `**********`). "
        "Prefer `RECSYS_KAFKA_SASL_PASSWORD_FILE`.",
    )
    kafka_sasl_password_file: Path | None = Field(
        None, description="A file holding the SASL password (whitespace around it ignored), instead of "
        "`RECSYS_KAFKA_SASL_PASSWORD`."
    )
    kafka_ssl_ca_file: Path | None = Field(
        None,
        description="PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL). "
        "Empty: the system's trust store (the local secured broker: its own CA).",
    )
    api_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token the aggregator's read API asks for (`Authorization: Bearer "
        "<token>`; /ready stays open). Empty: no token; with Kafka secured the aggregator then "
        "refuses to start (the launchers pass a generated one).",
    )
    dashboard_token: SecretStr = Field(
        SecretStr(""),
        description="Token the dashboard asks for (open `/?token=<token>` once: a cookie keeps "
        "it; or `Authorization: Bearer`). Empty: none; with Kafka secured the dashboard then "
        "refuses to start (the launchers pass a generated one).",
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for server in v.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("allowed: host:port[,host:port...] with a port in 1-65535")
        return v

    @field_validator("dashboard_allow_websocket_origin", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("tune_ranks", "tune_reg_params", "tune_alphas", mode="before")
    @classmethod
    def _grid(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("tune_ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if any(not 1 <= r <= 1000 for r in v):
            raise ValueError("allowed: ranks from 1 to 1000, comma-separated")
        return v

    @field_validator("tune_reg_params", "tune_alphas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not x >= 0 for x in v):
            raise ValueError("allowed: numbers >= 0, comma-separated")
        return v

    @field_validator("non_product_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"allowed: a regular expression ({exc})") from None
        return v

    @field_validator("spark_master")
    @classmethod
    def _master(cls, v: str) -> str:
        if not (v.startswith(("local", "spark://", "yarn", "k8s://"))):
            raise ValueError("allowed: local[N], spark://host:port, yarn or k8s://...")
        return v

    @field_validator("kafka_security_protocol", "kafka_sasl_password_file", "kafka_ssl_ca_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _security(self) -> Settings:
        """Combinations a client would otherwise find out about at the broker (or never)."""
        problem = security_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def secured(self) -> bool:
        """Kafka is reached securely (the HTTP servers then insist on their tokens)."""
        return self.broker_secure or (self.kafka_security_protocol or "PLAINTEXT") != "PLAINTEXT"

    # --- derived paths ----------------------------------------------------------------------------
    @property
    def store(self) -> str:
        return self.store_path or str((self.data_dir / "store").absolute())

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_path or str((self.data_dir / "checkpoints").absolute())

    @property
    def models(self) -> str:
        return self.models_path or str((self.data_dir / "models").absolute())


def security_problem(s: Settings) -> str | None:
    """The one line saying what is wrong with the security settings, or None."""
    proto = s.kafka_security_protocol
    effective = proto or ("SASL_SSL" if s.broker_secure else "PLAINTEXT")
    sasl, tls = effective.startswith("SASL_"), effective in ("SSL", "SASL_SSL")
    env = ENV_PREFIX
    pw, pw_file = s.kafka_sasl_password.get_secret_value(), s.kafka_sasl_password_file
    if s.broker_secure and proto not in (None, "SASL_SSL"):
        return (f"bad setting {env}KAFKA_SECURITY_PROTOCOL={proto!r}: allowed with "
                f"{env}BROKER_SECURE=true: SASL_SSL or empty (its only port is SASL_SSL)")
    if not sasl and (s.kafka_sasl_username or pw or pw_file):
        name = "KAFKA_SASL_USERNAME" if s.kafka_sasl_username else (
            "KAFKA_SASL_PASSWORD" if pw else "KAFKA_SASL_PASSWORD_FILE")
        shown = "**********" if name == "KAFKA_SASL_PASSWORD" else str(
            s.kafka_sasl_username or pw_file)
        return (f"bad setting {env}{name}={shown!r}: allowed only with "
                f"{env}KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL (it is {effective})")
    if not tls and s.kafka_ssl_ca_file is not None:
        return (f"bad setting {env}KAFKA_SSL_CA_FILE={str(s.kafka_ssl_ca_file)!r}: allowed only "
                f"with {env}KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL (it is {effective})")
    if pw and pw_file is not None:
        return (f"bad setting {env}KAFKA_SASL_PASSWORD_FILE={str(pw_file)!r}: allowed: either it "
                f"or {env}KAFKA_SASL_PASSWORD, not both")
    if pw_file is not None and not Path(pw_file).is_file():
        return (f"bad setting {env}KAFKA_SASL_PASSWORD_FILE={str(pw_file)!r}: allowed: an "
                "existing file holding the password (no such file)")
    if s.kafka_ssl_ca_file is not None and not Path(s.kafka_ssl_ca_file).is_file():
        return (f"bad setting {env}KAFKA_SSL_CA_FILE={str(s.kafka_ssl_ca_file)!r}: allowed: an "
                "existing PEM file (no such file)")
    if sasl and not s.broker_secure:  # the local secured broker supplies what is missing
        if not s.kafka_sasl_username:
            return (f"bad setting {env}KAFKA_SASL_USERNAME='': allowed: a user name "
                    f"({env}KAFKA_SECURITY_PROTOCOL={effective} authenticates)")
        if not pw and pw_file is None:
            return (f"bad setting {env}KAFKA_SASL_PASSWORD_FILE='': allowed: a file holding "
                    f"the password of {s.kafka_sasl_username!r}, or {env}KAFKA_SASL_PASSWORD "
                    f"({env}KAFKA_SECURITY_PROTOCOL={effective} authenticates)")
    for name in ("api_token", "dashboard_token"):
        token = getattr(s, name).get_secret_value()
        if token and (len(token) < 16 or any(c.isspace() for c in token)):
            return (f"bad setting {env}{name.upper()}='**********': allowed: at least 16 "
                    "characters, no spaces")
    return None


def _describe(err: dict[str, Any]) -> str:
    if not err.get("loc") and err.get("type") == "value_error":  # a whole-object check: its line
        return str((err.get("ctx") or {}).get("error", err.get("msg")))
    field = str(err["loc"][0]) if err.get("loc") else "?"
    var = ENV_PREFIX + field.upper()
    value = err.get("input")
    allowed = err.get("msg", "invalid")
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"allowed: {ctx['expected']}"
    elif err.get("type") == "value_error":
        allowed = str(ctx.get("error", allowed))
    elif err.get("type") == "extra_forbidden":
        return f"unknown setting {var}={value!r}: see `recsys config` for the allowed names"
    return f"bad setting {var}={value!r}: {allowed}"


def load(**overrides: Any) -> Settings:
    """Settings from the environment, with non-None `overrides` (CLI flags) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc.errors()[0])) from None


def override(settings: Settings, **flags: Any) -> Settings:
    """`settings` with a command's flags that were given (not None) on top, validated again like
    the environment (a bad flag raises SettingsError naming its variable); the same object when
    none was given. The one way every subcommand lays its flags over the settings."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return settings
    return load(**{**settings.model_dump(), **given})


def markdown_table() -> str:
    """The configuration reference, as README shows it."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else str(default)
        if isinstance(default, list) and default:  # as the variable is written
            shown = ",".join(str(x) for x in default)
        shown = shown.replace("|", "\\|")  # a pipe would end the table's cell
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(rows)
