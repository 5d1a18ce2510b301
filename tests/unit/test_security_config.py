"""Security without a JVM or a broker: settings validation, the client options every library gets
from one place, the roles' ACLs, the secured broker's properties, redaction, the HTTP tokens."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recsys import paths, security
from recsys.kafka import (
    admin_config,
    aiokafka_security,
    consumer_config,
    faust_credentials,
    java_security_options,
    producer_config,
    security_config,
)
from recsys.settings import Settings, SettingsError, load

pytestmark = pytest.mark.unit

PASSWORD = "s3cret-Pa55word-never-shown"
TOKEN = "t0ken-for-the-read-api-0123456789"


@pytest.fixture
def pw_file(tmp_path: Path) -> Path:
    f = tmp_path / "user.password"
    f.write_text(PASSWORD + "\n")
    return f


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    f = tmp_path / "ca.pem"
    f.write_text("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n")
    return f


def sasl_ssl(pw_file: Path, ca_file: Path, **kw) -> Settings:
    return load(kafka_security_protocol="SASL_SSL", kafka_sasl_username="stream",
                kafka_sasl_password_file=pw_file, kafka_ssl_ca_file=ca_file, **kw)


# --- settings ---------------------------------------------------------------------------------


def test_plaintext_by_default_adds_no_option():
    s = load()
    assert not s.secured
    assert security_config(s) == {} and java_security_options(s) == {}
    assert aiokafka_security(s) == {} and faust_credentials(s) is None
    assert producer_config(s)["bootstrap.servers"] == s.kafka_bootstrap


@pytest.mark.parametrize("given, variable", [
    (dict(kafka_security_protocol="SASL_SSL"), "RECSYS_KAFKA_SASL_USERNAME=''"),
    (dict(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u"),
     "RECSYS_KAFKA_SASL_PASSWORD_FILE=''"),
    (dict(kafka_sasl_username="u"), "RECSYS_KAFKA_SASL_USERNAME='u'"),
    (dict(kafka_security_protocol="SSL", kafka_sasl_password="x"),
     "RECSYS_KAFKA_SASL_PASSWORD='**********'"),
    (dict(kafka_ssl_ca_file="/etc/hostname"), "RECSYS_KAFKA_SSL_CA_FILE='/etc/hostname'"),
    (dict(kafka_security_protocol="SSL", kafka_ssl_ca_file="/no/such.pem"),
     "RECSYS_KAFKA_SSL_CA_FILE='/no/such.pem'"),
    (dict(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u",
          kafka_sasl_password_file="/no/such"), "RECSYS_KAFKA_SASL_PASSWORD_FILE='/no/such'"),
    (dict(broker_secure=True, kafka_security_protocol="PLAINTEXT"),
     "RECSYS_KAFKA_SECURITY_PROTOCOL='PLAINTEXT'"),
    (dict(kafka_security_protocol="TLS"), "RECSYS_KAFKA_SECURITY_PROTOCOL='TLS'"),
    (dict(kafka_sasl_mechanism="GSSAPI"), "RECSYS_KAFKA_SASL_MECHANISM='GSSAPI'"),
    (dict(api_token="short"), "RECSYS_API_TOKEN='**********'"),
    (dict(dashboard_token="has a space in it, sixteen+"), "RECSYS_DASHBOARD_TOKEN='**********'"),
])
def test_a_bad_combination_fails_in_one_line_naming_the_setting(given, variable):
    with pytest.raises(SettingsError) as exc:
        load(**given)
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"bad setting {variable}"), line
    assert "allowed" in line or "needs" in line or "empty" in line


def test_password_and_password_file_together_are_refused(pw_file: Path):
    with pytest.raises(SettingsError, match="RECSYS_KAFKA_SASL_PASSWORD_FILE=.*not both") as exc:
        load(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u",
             kafka_sasl_password=PASSWORD, kafka_sasl_password_file=pw_file)
    assert PASSWORD not in str(exc.value)


def test_environment_variables_land_in_the_security_fields(monkeypatch, pw_file, ca_file):
    for k, v in {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                 "KAFKA_SASL_USERNAME": "speed", "KAFKA_SASL_PASSWORD_FILE": str(pw_file),
                 "KAFKA_SSL_CA_FILE": str(ca_file), "API_TOKEN": TOKEN,
                 "DASHBOARD_TOKEN": TOKEN[::-1], "BROKER_SECURE": "false"}.items():
        monkeypatch.setenv(f"RECSYS_{k}", v)
    s = load()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism, s.kafka_sasl_username) == (
        "SASL_SSL", "SCRAM-SHA-256", "speed")
    assert s.kafka_sasl_password_file == pw_file and s.kafka_ssl_ca_file == ca_file
    assert s.api_token.get_secret_value() == TOKEN and s.secured
    monkeypatch.setenv("RECSYS_KAFKA_SSL_CA_FILE", "")  # empty is unset
    assert load().kafka_ssl_ca_file is None


# --- one place builds every client's options -----------------------------------------------------


def test_librdkafka_options(pw_file: Path, ca_file: Path):
    s = sasl_ssl(pw_file, ca_file)
    want = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "stream", "sasl.password": PASSWORD, "ssl.ca.location": str(ca_file)}
    assert security_config(s) == want
    for conf in (producer_config(s), consumer_config(s, "g"), admin_config(s)):
        assert want.items() <= conf.items()
    assert producer_config(s)["enable.idempotence"] is True  # defaults kept


def test_java_options_for_spark(pw_file: Path, ca_file: Path):
    opts = java_security_options(sasl_ssl(pw_file, ca_file))
    assert opts["kafka.security.protocol"] == "SASL_SSL"
    assert opts["kafka.sasl.mechanism"] == "SCRAM-SHA-512"
    assert opts["kafka.sasl.jaas.config"] == (
        f'{security.SCRAM_LOGIN} required username="stream" password="{PASSWORD}";')
    assert opts["kafka.ssl.truststore.type"] == "PEM"
    assert opts["kafka.ssl.truststore.location"] == str(ca_file)
    plain = java_security_options(load(kafka_security_protocol="SASL_PLAINTEXT",
                                       kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
                                       kafka_sasl_password=PASSWORD))
    assert plain["kafka.sasl.jaas.config"].startswith(security.PLAIN_LOGIN)
    assert "kafka.ssl.truststore.location" not in plain


def test_spark_source_and_sink_take_them(pw_file: Path, ca_file: Path):
    from spark.publish import kafka_sink_options

    s = sasl_ssl(pw_file, ca_file)
    assert java_security_options(s).items() <= kafka_sink_options(s).items()
    source = Path(paths.ROOT, "spark", "ingest.py").read_text()
    assert ".options(**java_security_options(settings))" in source


def test_aiokafka_and_faust_options(tmp_path: Path, pw_file: Path):
    # a real CA, so the TLS context can load it
    ca = _real_ca(tmp_path)
    s = sasl_ssl(pw_file, ca)
    opts = aiokafka_security(s)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "stream" and opts["sasl_plain_password"] == PASSWORD
    assert opts["ssl_context"].check_hostname
    creds = faust_credentials(s)
    assert creds.username == "stream" and creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.protocol.value == "SASL_SSL"
    assert PASSWORD not in repr(creds)
    from streams.sales_reader import consumer_options

    assert opts.keys() <= consumer_options(s, "g").keys()


def _real_ca(tmp_path: Path) -> Path:
    m = security.prepare(tmp_path / "broker")
    return m.ca


# --- the local secured broker: material, properties, ACLs, what each launcher passes ------------


def test_material_is_private_and_the_properties_have_no_plaintext_port(tmp_path: Path):
    broker = tmp_path / "kafka"
    m = security.prepare(broker)
    assert stat.S_IMODE(os.stat(broker).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(m.folder).st_mode) == 0o700
    for f in m.folder.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f
    before = {u: m.password(u).get_secret_value() for u in security.ROLES}
    assert len(set(before.values())) == len(security.ROLES)  # one per role
    security.prepare(broker)  # a second start keeps them
    assert before == {u: m.password(u).get_secret_value() for u in security.ROLES}
    props = security.broker_properties(broker, 9093, 9094)
    assert props["listeners"] == "SASL_SSL://127.0.0.1:9093,CONTROLLER://127.0.0.1:9094"
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:9093"
    assert "PLAINTEXT:PLAINTEXT" not in props["listener.security.protocol.map"]
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin;User:controller"
    openssl = subprocess.run(["openssl", "verify", "-CAfile", str(m.ca), str(m.keystore)],
                             capture_output=True, text=True)
    assert openssl.returncode == 0, openssl.stderr  # the broker's cert is signed by our CA


def test_the_broker_launcher_merges_them(tmp_path: Path):
    from recsys.broker import LocalBroker

    broker = LocalBroker(tmp_path / "kafka", 9093, 9094, secure=True)
    security.prepare(broker.data_dir)
    props = broker.properties()
    assert props["listeners"].startswith("SASL_SSL://") and props["node.id"] == "1"
    assert LocalBroker(tmp_path / "plain", 9093, 9094).properties()["listeners"].startswith(
        "PLAINTEXT://")


def test_format_argfile_keeps_passwords_off_the_command_line(tmp_path: Path):
    m = security.prepare(tmp_path / "kafka")
    f = security.format_argfile(tmp_path / "kafka", ["-cp", "x.jar", "kafka.tools.StorageTool"])
    text = f.read_text()
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    for role in security.ROLES:
        assert f'"SCRAM-SHA-512=[name={role},password={m.password(role).get_secret_value()}]"' \
            in text
    security.mark_formatted(tmp_path / "kafka")
    assert not f.exists()


def test_least_privilege_acls():
    acls = security.role_acls()
    assert set(acls) == set(security.ROLES) - {"admin"}  # admin is the super user

    def ops(role: str, name: str) -> set[str]:
        return {g.operation for g in acls[role] if g.resource == "topic" and g.name == name}

    assert ops("producer", "sales") == {"WRITE"}  # writes sales, cannot read them
    assert {g.resource for g in acls["producer"]} == {"topic"}
    assert all(g.operation == "READ" for g in acls["dashboard"])  # read only
    assert "WRITE" not in ops("dashboard", "recommendations")
    assert ops("stream", "sales") == {"READ"} and "WRITE" in ops("stream", "recommendations")
    assert ops("speed", "recommendations") == {"WRITE"}
    assert ops("aggregate", "feedback") == {"WRITE"}
    # no role can alter the cluster or anyone's ACLs
    assert not any(g.resource == "cluster" for grants in acls.values() for g in grants)
    assert len(security.acl_bindings(acls)) == sum(map(len, acls.values()))
    prefixed = security.role_acls("t1-")
    assert {g.name for g in prefixed["producer"]} == {"t1-sales", "t1-sales.dlq"}


def test_role_env_gives_each_process_its_principal(tmp_path: Path):
    m = security.prepare(tmp_path / "kafka")
    launcher = load(data_dir=tmp_path, broker_secure=True)
    env = security.role_env(launcher, "speed")
    assert env["RECSYS_KAFKA_SASL_USERNAME"] == "speed"
    assert env["RECSYS_KAFKA_SASL_PASSWORD_FILE"] == str(m.password_file("speed"))
    assert env["RECSYS_KAFKA_SSL_CA_FILE"] == str(m.ca)
    assert all(m.password("speed").get_secret_value() not in v for v in env.values())
    agg = security.role_env(launcher, "aggregate")
    assert agg["RECSYS_API_TOKEN"] == m.token_file("aggregate").read_text().strip()
    # the child's settings from that environment: valid, and its own user
    child = load(**{k.removeprefix("RECSYS_").lower(): v for k, v in env.items()},
                 data_dir=tmp_path)
    assert security.client_security(child).username == "speed"
    assert security_config(child)["sasl.password"] == m.password("speed").get_secret_value()
    # the shell (no client settings): the local admin
    shell = security.client_security(launcher)
    assert (shell.protocol, shell.username, shell.ca_file) == ("SASL_SSL", "admin", m.ca)
    # not secured, or configured for another cluster: the launcher passes nothing
    assert security.role_env(load(data_dir=tmp_path), "speed") == {}


def test_secured_shell_before_the_broker_made_its_files(tmp_path: Path):
    with pytest.raises(SettingsError, match="RECSYS_BROKER_SECURE=true: no password for user "
                                            "'admin'.*recsys broker start"):
        security.client_security(load(data_dir=tmp_path, broker_secure=True))


# --- secrets never shown ---------------------------------------------------------------------------


def test_recsys_config_masks_the_password_and_the_tokens(pw_file: Path, ca_file: Path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
           "RECSYS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RECSYS_KAFKA_SASL_USERNAME": "u",
           "RECSYS_KAFKA_SASL_PASSWORD": PASSWORD, "RECSYS_API_TOKEN": TOKEN,
           "RECSYS_DASHBOARD_TOKEN": TOKEN[::-1]}
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "config"], env=env,
                          capture_output=True, text=True, cwd=paths.ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "RECSYS_KAFKA_SASL_PASSWORD=**********" in done.stdout
    assert "RECSYS_API_TOKEN=**********" in done.stdout
    for secret in (PASSWORD, TOKEN, TOKEN[::-1]):
        assert secret not in done.stdout + done.stderr


def test_settings_repr_and_errors_hold_no_secret(pw_file: Path, ca_file: Path):
    s = sasl_ssl(pw_file, ca_file, api_token=TOKEN)
    assert PASSWORD not in repr(s) and TOKEN not in repr(s) and TOKEN not in str(s.model_dump())
    assert PASSWORD not in repr(security.client_security(s))
    with pytest.raises(SettingsError) as exc:
        load(kafka_sasl_password=PASSWORD)  # PLAINTEXT: refused, the value masked
    assert PASSWORD not in str(exc.value)
    assert security.redact(f"failed: password={PASSWORD} token {TOKEN}", s) == \
        "failed: password=*** token ***"


# --- the HTTP side -------------------------------------------------------------------------------


def test_read_api_token():
    from streams.views import authorized, token_problem

    open_ = load()
    assert authorized(open_, None) and token_problem(open_) is None
    s = load(api_token=TOKEN)
    assert authorized(s, f"Bearer {TOKEN}") and authorized(s, f"bearer  {TOKEN} ")
    for header in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}"):
        assert not authorized(s, header), header


def test_secured_without_tokens_refuses_to_start(tmp_path: Path, pw_file: Path, ca_file: Path):
    from streams.views import token_problem
    from visualizer.server import token_problem as dashboard_problem

    s = sasl_ssl(pw_file, ca_file)
    assert "RECSYS_API_TOKEN is empty while Kafka is secured" in token_problem(s)
    assert "RECSYS_DASHBOARD_TOKEN is empty while Kafka is secured" in dashboard_problem(s)
    ok = sasl_ssl(pw_file, ca_file, api_token=TOKEN, dashboard_token=TOKEN)
    assert token_problem(ok) is None and dashboard_problem(ok) is None
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
           "RECSYS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RECSYS_KAFKA_SASL_USERNAME": "u",
           "RECSYS_KAFKA_SASL_PASSWORD_FILE": str(pw_file),
           "RECSYS_KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # nothing listens: refused before I/O
    for command in ("aggregate", "dashboard"):
        done = subprocess.run([sys.executable, "-m", "recsys.cli", command], env=env,
                              capture_output=True, text=True, cwd=paths.ROOT, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "is empty while Kafka is secured" in done.stderr


def test_dashboard_token_auth():
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    from visualizer.auth import COOKIE, USER, TokenAuth

    auth = TokenAuth(TOKEN)

    class Handler:
        def __init__(self, query: str = "", headers: dict[str, str] | None = None) -> None:
            self.request = HTTPServerRequest(
                start_line=RequestStartLine("GET", "/?" + query, "HTTP/1.1"),
                headers=HTTPHeaders({"Host": "127.0.0.1", **(headers or {})}))
            self.cookies_set: dict[str, str] = {}

        def get_query_argument(self, name, default=None):
            values = self.request.query_arguments.get(name)
            return values[-1].decode() if values else default

        def get_cookie(self, name, default=None):
            morsel = self.request.cookies.get(name)
            return morsel.value if morsel else default

        def set_cookie(self, name, value, **kw):
            self.cookies_set[name] = value

    h = Handler(f"token={TOKEN}")
    assert auth.get_user(h) == USER and h.cookies_set == {COOKIE: TOKEN}
    assert auth.get_user(Handler(headers={"Authorization": f"Bearer {TOKEN}"})) == USER
    assert auth.get_user(Handler(headers={"Cookie": f"{COOKIE}={TOKEN}"})) == USER
    for bad in (Handler(), Handler("token=nope"), Handler(headers={"Cookie": f"{COOKIE}=x"})):
        assert auth.get_user(bad) is None
    assert auth.login_url == "/login"


def test_dashboard_access_log_hides_the_token():
    import logging

    from visualizer.auth import HideTokenInAccessLog, TokenAuth

    TokenAuth(TOKEN)  # installs the filter on tornado's access log
    assert any(isinstance(f, HideTokenInAccessLog)
               for f in logging.getLogger("tornado.access").filters)
    record = logging.LogRecord("tornado.access", logging.INFO, __file__, 1, "%d %s %.2fms",
                               (200, f"GET /?token={TOKEN}&x=1 (127.0.0.1)", 3.0), None)
    HideTokenInAccessLog().filter(record)
    assert record.getMessage() == "200 GET /?token=***&x=1 (127.0.0.1) 3.00ms"


def test_a_refused_operation_becomes_one_line(pw_file: Path, ca_file: Path):
    from confluent_kafka import KafkaError, KafkaException

    from recsys.kafka import refusal_line

    s = sasl_ssl(pw_file, ca_file)
    fatal = KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED))
    wrapped = SystemError("<built-in function len> returned a result with an exception set")
    wrapped.__cause__ = fatal  # how confluent-kafka raises a fatal error from a callback
    line = refusal_line(s, wrapped)
    assert line is not None and "\n" not in line
    assert line.startswith(f"Kafka at {s.kafka_bootstrap} refused user 'stream' this command")
    assert "RECSYS_KAFKA_SASL_USERNAME" in line
    assert refusal_line(s, KafkaException(KafkaError(KafkaError._TRANSPORT))) is None
    assert refusal_line(s, ValueError("not Kafka")) is None
