"""Security end to end on a REAL secured broker (`LocalBroker(secure=True)`, as
`RECSYS_BROKER_SECURE=true recsys broker start` runs it): one SASL_SSL port, a SCRAM user and
ACLs per role. Each process runs as its role with the environment the launchers give it
(`recsys.security.role_env`, what `recsys up` passes), and no output may hold a secret.

One secured broker serves the module; the flow test runs produce -> stream (Spark) -> the
aggregator (Faust) -> the dashboard's consumer and its HTTP server, about two minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from recsys import paths, security
from recsys.broker import LocalBroker, free_port, read_properties
from recsys.kafka import consumer_config, producer_config, read_to_end
from recsys.settings import Settings, load
from recsys.topics import create_topics
from schemas import codec
from schemas import topics as T
from tests.waiting import exited, wait_for

pytestmark = pytest.mark.integration

EVENTS, USERS, PRODUCTS = 3000, 150, 80
WAIT = 240.0


class Secured:
    """The module's secured broker, seen through a launcher's folder (`<home>/kafka` is the
    broker's folder), so `role_env` gives each process exactly what `recsys up` gives it."""

    def __init__(self, broker: LocalBroker, home: Path) -> None:
        self.broker, self.home = broker, home
        home.mkdir(parents=True, exist_ok=True)
        (home / "kafka").symlink_to(broker.data_dir, target_is_directory=True)
        self.material = security.material(broker.data_dir)

    @property
    def launcher(self) -> Settings:
        """The launcher's (and the shell's) settings: only RECSYS_BROKER_SECURE=true."""
        return load(kafka_bootstrap=self.broker.bootstrap, data_dir=self.home, broker_secure=True)

    def env(self, role: str, data_dir: Path, **extra: str) -> dict[str, str]:
        """A child's environment: nothing of ours inherited, the launcher's role_env added."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        return {**base, "RECSYS_KAFKA_BOOTSTRAP": self.broker.bootstrap,
                "RECSYS_DATA_DIR": str(data_dir), "RECSYS_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1", **security.role_env(self.launcher, role), **extra}

    def settings(self, role: str, data_dir: Path, **kw: Any) -> Settings:
        """In-process settings of `role`, from the same environment a child gets."""
        env = self.env(role, data_dir)
        return load(
            kafka_bootstrap=self.broker.bootstrap, data_dir=data_dir,
            kafka_security_protocol=env["RECSYS_KAFKA_SECURITY_PROTOCOL"],
            kafka_sasl_username=role,
            kafka_sasl_password_file=env["RECSYS_KAFKA_SASL_PASSWORD_FILE"],
            kafka_ssl_ca_file=env["RECSYS_KAFKA_SSL_CA_FILE"], **kw)

    def secrets(self) -> list[str]:
        files = [self.material.password_file(u) for u in (*security.ROLES, security.CONTROLLER)]
        files += [self.material.token_file(r) for r in security.TOKENS]
        return [f.read_text().strip() for f in files]


@pytest.fixture(scope="module")
def secured(broker_factory, tmp_path_factory: pytest.TempPathFactory) -> Secured:
    s = Secured(broker_factory.start(secure=True), tmp_path_factory.mktemp("secured"))
    create_topics(s.launcher)  # as `admin`, the shell's default on the secured local broker
    return s


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float = WAIT
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "recsys.cli", *args], env=env, cwd=paths.ROOT,
                          capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ recsys {' '.join(args)}\n{done.stdout}{done.stderr}")
    return done


class Child:
    """A long-running `recsys` subcommand logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *args], env=env,
                                         cwd=paths.ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_for(self, what: str, check: Any, timeout: float = WAIT) -> Any:
        """`check()`'s first truthy value; a server not answering yet counts as not yet."""
        assert self.proc is not None
        return wait_for(what, check, timeout, 0.3, exited(self.proc, "the process"), self.tail,
                        (OSError,))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token
                                 else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # a loaded machine: the first page
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- refusals ----------------------------------------------------------------------------------


def test_no_plaintext_port_and_plaintext_is_refused(secured: Secured):
    props = read_properties(secured.broker.properties_path)
    assert props["listeners"].startswith("SASL_SSL://127.0.0.1:")
    assert "PLAINTEXT://" not in props["listeners"].replace("SASL_PLAINTEXT", "")
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert os.stat(secured.broker.properties_path).st_mode & 0o077 == 0  # it holds passwords
    for port in (secured.broker.port, secured.broker.controller_port):
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
        with pytest.raises(KafkaException):  # the port closes on a plaintext request
            admin.list_topics(timeout=4)


def test_client_without_credentials_is_refused(secured: Secured):
    """TLS with the right CA but no SASL login: the broker closes the connection."""
    admin = AdminClient({"bootstrap.servers": secured.broker.bootstrap, "log_level": 0,
                         "security.protocol": "SSL", "ssl.ca.location": str(secured.material.ca)})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=4)


def test_wrong_password_fails_with_one_line_naming_the_setting(secured: Secured, tmp_path: Path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-of-producer\n")
    env = secured.env("producer", tmp_path, RECSYS_KAFKA_SASL_PASSWORD_FILE=str(wrong))
    done = _run(["consume", T.SALES, "--max", "1", "--timeout", "1"], env, tmp_path / "out.log")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"recsys: bad setting RECSYS_KAFKA_SASL_PASSWORD_FILE="
                               f"'{wrong}': Kafka at {secured.broker.bootstrap} refused user "
                               "'producer'"), lines[0]
    assert "not-the-password" not in done.stderr + done.stdout


def test_dashboard_principal_cannot_write_recommendations(secured: Secured, tmp_path: Path):
    conf = {**producer_config(secured.settings("dashboard", tmp_path)), "log_level": 0}
    # Idempotent (our default): refused its producer id, a fatal error the client raises.
    producer = Producer(conf)
    producer.produce(T.RECOMMENDATIONS, key=b"u1", value=b"forged")
    with pytest.raises(KafkaException) as fatal:
        producer.flush(30)
    assert fatal.value.args[0].code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED
    # Plain: refused at the topic.
    errors: list[Any] = []
    producer = Producer({**conf, "enable.idempotence": False, "message.timeout.ms": 20_000})
    producer.produce(T.RECOMMENDATIONS, key=b"u1", value=b"forged",
                     on_delivery=lambda err, msg: errors.append(err))
    producer.flush(30)
    assert [e.code() if e else None for e in errors] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    # nothing forged arrived (read as admin)
    assert all(m.value() != b"forged" for m in read_to_end(secured.launcher, T.RECOMMENDATIONS))


def test_producer_principal_writes_sales_but_cannot_read_them(secured: Secured, tmp_path: Path):
    settings = secured.settings("producer", tmp_path)
    producer = Producer(producer_config(settings))
    delivered: list[Any] = []
    producer.produce(T.SALES_DLQ, key=b"test", value=b"probe",
                     on_delivery=lambda err, msg: delivered.append(err))
    producer.flush(30)
    assert delivered == [None]  # its topic: allowed
    consumer = Consumer({**consumer_config(settings, "recsys-probe"), "log_level": 0})
    try:
        consumer.assign([TopicPartition(T.SALES, 0, 0)])
        deadline, codes = time.monotonic() + 30, set()
        while KafkaError.TOPIC_AUTHORIZATION_FAILED not in codes:
            assert time.monotonic() < deadline, f"no refusal to read sales: {codes}"
            for m in consumer.consume(10, timeout=0.5):
                assert m.error() is not None, "the producer principal read a sale"
                codes.add(m.error().code())
    finally:
        consumer.close()


# --- the whole flow, each process as its role --------------------------------------------------


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in reversed(started):
        child.stop()


def test_whole_flow_secured_and_no_secret_in_any_output(
        secured: Secured, tmp_path: Path, children: list[Child], caplog):
    import logging

    from visualizer.feed import Feed
    from visualizer.state import DashboardState

    caplog.set_level(logging.DEBUG)
    log = tmp_path / "children.log"
    data = tmp_path / "var"
    # produce, as `producer`
    done = _run(["produce", "--synthetic", "--events", str(EVENTS), "--users", str(USERS),
                 "--products", str(PRODUCTS), "--seed", "7", "--no-progress"],
                secured.env("producer", data), log)
    assert done.returncode == 0, done.stdout + done.stderr
    # stream: Spark's Kafka source and sink, as `stream`; one model at the threshold
    done = _run(["stream", "--once", "--threshold", "1000"], secured.env(
        "stream", data, RECSYS_SPARK_DRIVER_MEMORY="1g", RECSYS_ALS_MAX_ITER="5",
        RECSYS_ALS_RANK="8", RECSYS_WARM_UP="false", RECSYS_PROMOTE_GATE="false",
        RECSYS_SPARK_SHUFFLE_PARTITIONS="2",
        RECSYS_EXPORT_DIR=str(tmp_path / "exp"),
        PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1"), log, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ready = [codec.decode(m.value())[1] for m in read_to_end(secured.launcher, T.MODEL_READY)]
    assert len(ready) == 1
    recs = [codec.decode(m.value())[1] for m in read_to_end(secured.launcher, T.RECOMMENDATIONS)]
    assert len({r["user_id"] for r in recs}) > USERS // 2
    # the aggregator, as `aggregate`, its read API behind the token the launcher passes
    port = free_port()
    agg_env = secured.env("aggregate", data, RECSYS_AGGREGATE_WEB_PORT=str(port))
    token = agg_env["RECSYS_API_TOKEN"]
    agg = Child(["aggregate"], agg_env, tmp_path / "aggregate.log")
    children.append(agg)
    base = f"http://127.0.0.1:{port}"
    agg.wait_for("/ready", lambda: _get(f"{base}/ready")[0] == 200)
    assert _get(f"{base}/stats")[0] == 401
    assert _get(f"{base}/stats", "x" * 43)[0] == 401
    status, body = _get(f"{base}/stats", token)
    assert status == 200 and json.loads(body)["serving"] == ready[0]["model_version"]
    user = recs[0]["user_id"]

    def user_list() -> bool:  # /ready says a model exists; its lists may still be arriving
        status, body = _get(f"{base}/recommendations/{user}", token)
        assert status == 200, body
        return json.loads(body)["source"] == "retrain"

    agg.wait_for(f"{user}'s list in the read API", user_list)
    assert _get(f"{base}/recommendations/{user}")[0] == 401
    # the speed layer, as `speed`: a new sale (sent as `producer`) folded into its user's list
    speed = Child(["speed"], secured.env("speed", data), tmp_path / "speed.log")
    children.append(speed)
    product = recs[0]["items"][-1]["product_id"]
    sale = {"event_id": "secured:1", "user_id": user, "product_id": product, "quantity": 3,
            "event_time": datetime.now(UTC), "unit_price": 1.0}
    producer = Producer(producer_config(secured.settings("producer", data)))
    producer.produce(T.SALES, key=user, value=codec.encode("Sale", sale))
    assert producer.flush(30) == 0

    def folded() -> bool:
        return any(r.get("sale_event_id") == "secured:1" for r in (
            codec.decode(m.value())[1]
            for m in read_to_end(secured.launcher, T.RECOMMENDATIONS, last=50)))

    speed.wait_for("the fold-in of the new sale", folded)
    # the dashboard's consumer, as `dashboard`: reads every result topic to the end
    state = DashboardState(threshold=1000)
    feed = Feed(secured.settings("dashboard", data), state)
    feed.start()
    try:
        deadline = time.monotonic() + 120
        while not state.caught_up and time.monotonic() < deadline and feed.alive:
            time.sleep(0.2)
        assert state.caught_up, "the dashboard's consumer did not read the topics to their end"
        assert state.valid_sales > 0
        assert ready[0]["model_version"] in state.history
    finally:
        feed.stop()
    # the dashboard server, as `dashboard`, behind its token, foreign websockets refused
    dport = free_port()
    dash_env = secured.env("dashboard", data, RECSYS_DASHBOARD_PORT=str(dport))
    dash = Child(["dashboard"], dash_env, tmp_path / "dashboard.log")
    children.append(dash)
    dtoken = dash_env["RECSYS_DASHBOARD_TOKEN"]
    page = f"http://127.0.0.1:{dport}/"
    dash.wait_for("the dashboard", lambda: _get(page)[0] in (401, 200))
    assert _get(page)[0] == 401  # redirected to /login
    assert _get(f"{page}?token={'y' * 43}")[0] == 401
    assert _get(f"{page}?token={dtoken}")[0] == 200
    # A page of another origin: refused at the handshake, even with the token's cookie.
    assert _websocket(dport, dtoken, origin="http://evil.example") == (403, None)
    # Our own origin passes the handshake; without the token Bokeh closes it unserved.
    assert _websocket(dport, dtoken, origin=f"http://127.0.0.1:{dport}")[0] == 101
    assert _websocket(dport, None, origin=f"http://127.0.0.1:{dport}") == (101, None)
    # `recsys config` as a role: the password never, not even masked differently
    done = _run(["config"], {**secured.env("aggregate", data),
                             "RECSYS_KAFKA_SASL_PASSWORD_FILE": "",
                             "RECSYS_KAFKA_SASL_PASSWORD": secured.material.password(
                                 "aggregate").get_secret_value()}, log)
    assert done.returncode == 0 and "RECSYS_KAFKA_SASL_PASSWORD=**********" in done.stdout
    # no secret anywhere: children's output, our own logs, model-ready's params
    for child in children:
        child.stop()
    outputs = {"children": log.read_text(), "aggregate": agg.log.read_text(),
               "dashboard": dash.log.read_text(), "speed": speed.log.read_text(),
               "caplog": caplog.text,
               "model-ready": json.dumps(ready, default=str),
               "broker.log": secured.broker.log_path.read_text(errors="replace")}
    for name, text in outputs.items():
        for secret in secured.secrets():
            assert secret not in text, f"a secret appears in {name}"
    assert "SASL_SSL" in outputs["aggregate"] + outputs["children"]  # we did look at real logs


def _websocket(port: int, token: str | None, origin: str) -> tuple[int, str | None]:
    """(HTTP status of a websocket handshake to the dashboard, 101 when it opened; the first
    message the server sent, None when it closed the socket without one)."""
    import asyncio

    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    headers = {"Origin": origin}
    if token:
        headers["Cookie"] = f"recsys_dashboard_token={token}"

    async def attempt() -> tuple[int, str | None]:
        req = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers=headers, follow_redirects=False)
        try:
            conn = await websocket_connect(req)
        except HTTPClientError as exc:
            return exc.code, None
        try:
            first = await asyncio.wait_for(conn.read_message(), timeout=10)
        finally:
            conn.close()
        return 101, first if first is None else str(first)[:80]

    return asyncio.run(attempt())
