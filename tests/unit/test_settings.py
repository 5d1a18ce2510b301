"""Every RECSYS_* variable lands where documented; each bad value fails cleanly (gorse TestBindEnv /
ValidateTestSuite)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from recsys import settings as settings_mod
from recsys.settings import ENV_PREFIX, Settings, SettingsError, load

pytestmark = pytest.mark.unit

# One good non-default value per setting: (env value, expected attribute value).
GOOD = {
    "kafka_bootstrap": ("broker1:9093,broker2:9093", "broker1:9093,broker2:9093"),
    "topic_partitions": ("6", 6),
    "topic_replication": ("3", 3),
    "data_dir": ("/tmp/elsewhere", Path("/tmp/elsewhere")),
    "log_level": ("DEBUG", "DEBUG"),
    "broker_heap_mb": ("1024", 1024),
    "producer_batch_kb": ("64", 64),
    "producer_linger_ms": ("5", 5),
    "spark_master": ("spark://master:7077", "spark://master:7077"),
    "spark_shuffle_partitions": ("8", 8),
    "spark_driver_memory": ("2g", "2g"),
    "store_path": ("s3a://bucket/store", "s3a://bucket/store"),
    "checkpoint_path": ("hdfs:///ckpt", "hdfs:///ckpt"),
    "trigger_seconds": ("1.5", 1.5),
    "max_offsets_per_trigger": ("1000", 1000),
    "train_threshold": ("500", 500),
    "train_max_wait_seconds": ("60", 60.0),
    "warm_up": ("false", False),
    "split": ("random", "random"),
    "split_cutoff": ("2011-11-01T00:00:00Z", datetime(2011, 11, 1, tzinfo=UTC)),
    "test_fraction": ("0.2", 0.2),
    "als_mode": ("explicit", "explicit"),
    "als_rank": ("16", 16),
    "als_max_iter": ("5", 5),
    "als_reg_param": ("0.5", 0.5),
    "als_alpha": ("40", 40.0),
    "confidence": ("binary", "binary"),
    "tune_before_train": ("true", True),
    "tune_ranks": ("4, 8", [4, 8]),
    "tune_reg_params": ("0.05,0.5", [0.05, 0.5]),
    "tune_alphas": ("5", [5.0]),
    "seed": ("7", 7),
    "top_n": ("5", 5),
    "speed_max_batch": ("500", 500),
    "speed_commit_seconds": ("0.5", 0.5),
    "non_product_pattern": ("^POST$", "^POST$"),
    "promote_gate": ("false", False),
    "promote_tolerance": ("0.1", 0.1),
    "eval_k": ("20", 20),
    "filter_bought": ("false", False),
    "models_path": ("/models", "/models"),
    "export_dir": ("/tmp/exports", Path("/tmp/exports")),
    "aggregate_web_host": ("0.0.0.0", "0.0.0.0"),
    "aggregate_web_port": ("7000", 7000),
    "aggregate_keep_models": ("3", 3),
    "feedback_horizon_seconds": ("600", 600),
    "feedback_interval_seconds": ("2.5", 2.5),
    "feedback_retrain_share": ("0.5", 0.5),
    "dashboard_host": ("0.0.0.0", "0.0.0.0"),
    "dashboard_port": ("5106", 5106),
    "dashboard_allow_websocket_origin": ("a.example:5006,b.example:80", ["a.example:5006", "b.example:80"]),
    "train_path": ("distributed", "distributed"),
    "train_driver_max_events": ("500000", 500_000),
    "broker_secure": ("true", True),
    "kafka_security_protocol": ("SSL", "SSL"),
    "kafka_sasl_mechanism": ("PLAIN", "PLAIN"),
    "kafka_sasl_username": ("speed", "speed"),
    "kafka_sasl_password": ("pw", SecretStr("pw")),
    "kafka_sasl_password_file": ("/etc/hostname", Path("/etc/hostname")),
    "kafka_ssl_ca_file": ("/etc/hostname", Path("/etc/hostname")),
    "api_token": ("a" * 16, SecretStr("a" * 16)),
    "dashboard_token": ("b" * 16, SecretStr("b" * 16)),
}
# What a security setting needs beside it to be valid (recsys/settings.py security_problem).
COMPANIONS = {
    "kafka_sasl_username": {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_password": "pw"},
    "kafka_sasl_password": {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
    "kafka_sasl_password_file": {"kafka_security_protocol": "SASL_SSL",
                                 "kafka_sasl_username": "u"},
    "kafka_ssl_ca_file": {"kafka_security_protocol": "SSL"},
}

# One bad value per setting that has a constraint: (env value, words the error must contain).
BAD = {
    "kafka_bootstrap": ("nope", "host:port"),
    "topic_partitions": ("0", "greater than or equal to 1"),
    "log_level": ("LOUD", "DEBUG"),
    "broker_heap_mb": ("64", "256"),
    "spark_master": ("mesos://x", "local[N]"),
    "spark_driver_memory": ("lots", "pattern"),
    "trigger_seconds": ("0", "greater than 0"),
    "train_threshold": ("-1", "greater than or equal to 1"),
    "split": ("sideways", "'time' or 'random'"),
    "split_cutoff": ("not-a-date", "datetime"),
    "test_fraction": ("1.5", "less than 1"),
    "als_mode": ("magic", "'implicit' or 'explicit'"),
    "als_rank": ("zero", "integer"),
    "confidence": ("sqrt", "'log1p', 'raw' or 'binary'"),
    "tune_before_train": ("sometimes", "boolean"),
    "tune_ranks": ("8,0", "ranks from 1 to 1000"),
    "tune_reg_params": ("0.1,-1", "numbers >= 0"),
    "tune_alphas": ("ten", "valid number"),
    "filter_bought": ("maybe", "boolean"),
    "non_product_pattern": ("(POST", "regular expression"),
    "promote_tolerance": ("1.5", "less than or equal to 1"),
    "speed_max_batch": ("0", "greater than or equal to 1"),
    "warm_up": ("sometimes", "boolean"),
    "aggregate_web_port": ("70000", "less than or equal to 65535"),
    "feedback_retrain_share": ("2", "less than or equal to 1"),
    "dashboard_port": ("http", "integer"),
    "train_path": ("cluster", "'auto', 'driver' or 'distributed'"),
    "train_driver_max_events": ("-1", "greater than or equal to 0"),
    "broker_secure": ("sometimes", "boolean"),
    "kafka_security_protocol": ("TLS", "'SASL_SSL'"),
    "kafka_sasl_mechanism": ("GSSAPI", "'SCRAM-SHA-512'"),
    "kafka_sasl_username": ("u", "allowed only with"),  # PLAINTEXT: it would be ignored
    "kafka_sasl_password_file": ("/etc/hostname", "allowed only with"),
    "kafka_ssl_ca_file": ("/etc/hostname", "allowed only with"),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def test_every_setting_has_a_case_and_a_description():
    assert set(GOOD) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_defaults():
    s = load()
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.data_dir == Path("var")
    assert s.store.endswith("var/store")
    assert s.checkpoints.endswith("var/checkpoints")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_variable_lands_where_documented(monkeypatch, name):
    raw, expected = GOOD[name]
    monkeypatch.setenv(ENV_PREFIX + name.upper(), raw)
    for other, value in COMPANIONS.get(name, {}).items():
        monkeypatch.setenv(ENV_PREFIX + other.upper(), value)
    assert getattr(load(), name) == expected


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_value_names_setting_value_and_what_is_allowed(monkeypatch, name):
    raw, words = BAD[name]
    monkeypatch.setenv(ENV_PREFIX + name.upper(), raw)
    with pytest.raises(SettingsError) as err:
        load()
    line = str(err.value)
    assert "\n" not in line
    assert ENV_PREFIX + name.upper() in line
    assert repr(raw) in line
    assert words in line


def test_cli_flag_overrides_environment(monkeypatch):
    monkeypatch.setenv("RECSYS_KAFKA_BOOTSTRAP", "a:1")
    assert load(kafka_bootstrap="b:2").kafka_bootstrap == "b:2"
    assert load(kafka_bootstrap=None).kafka_bootstrap == "a:1"


def test_override_lays_given_flags_over_settings_and_validates_them(tmp_path):
    from recsys.settings import override

    base = load(data_dir=tmp_path, train_threshold=100)
    assert override(base, train_threshold=None) is base  # nothing given: the same object
    over = override(base, train_threshold=5, trigger_seconds=None)
    assert (over.train_threshold, over.data_dir, over.trigger_seconds) == (
        5, base.data_dir, base.trigger_seconds)
    with pytest.raises(SettingsError, match="RECSYS_TRAIN_THRESHOLD"):
        override(base, train_threshold=-1)


def test_settings_are_frozen():
    s = load()
    with pytest.raises(ValidationError):
        s.top_n = 3  # type: ignore[misc]


def test_bad_setting_exits_2_with_one_line_before_any_network_io(tmp_path):
    # The bootstrap points at a port nobody listens on: a network attempt would hang or fail
    # differently; the settings error must come first, with exit 2 and one line.
    env = {"RECSYS_ALS_RANK": "0", "RECSYS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "consume", "sales", "--max", "1"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "RECSYS_ALS_RANK" in lines[0] and "'0'" in lines[0]


def test_markdown_table_lists_every_variable():
    table = settings_mod.markdown_table()
    for name in Settings.model_fields:
        assert f"`{ENV_PREFIX}{name.upper()}`" in table
