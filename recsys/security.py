"""Security of the local broker and of every client: TLS material, SCRAM users, ACLs, credentials.

Two halves, both decided here and nowhere else:

* **The local broker, secured** (`RECSYS_BROKER_SECURE=true`). On first start `prepare()` writes,
  under `<broker folder>/security/` (mode 0700, files 0600): a CA and a broker certificate for
  127.0.0.1/localhost (openssl, EC P-256), and one generated password per role. The folder is
  formatted with a SCRAM-SHA-512 user per role (`kafka-storage format --add-scram`, passed through
  a 0600 Java argument file so no password shows in `ps`), the broker runs Kafka's
  `StandardAuthorizer` with `allow.everyone.if.no.acl.found=false`, and once it answers the
  launcher creates each role's ACLs (`ROLE_ACLS`) through the admin client. The only client port
  is SASL_SSL; there is no plaintext client port.

  The controller listener stays on loopback without TLS, but with SASL/PLAIN and a password of
  its own (`controller`, known only to the broker's 0600 server.properties): the KRaft
  controller cannot check SCRAM credentials (they live in the metadata it serves), and a client
  that finds the port can neither authenticate nor, unauthenticated, be authorized (ANONYMOUS
  is no super user and has no ACL).

* **Clients** (`client_security`): the protocol, mechanism, user, password (or password file) and
  CA of the settings; with the local secured broker and no client settings, its `admin`
  credentials (the person at the shell owns the folder anyway). The launchers give each
  process its own role's credentials instead (`role_env`). recsys/kafka.py turns the result into
  librdkafka, Java (Spark) and aiokafka (Faust) options.

Secrets never leave as text: passwords are `SecretStr` in the settings and in `ClientSecurity`,
`redact()` masks them in any string that could be shown, and nothing here logs one.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from recsys.settings import ENV_PREFIX, Settings, SettingsError
from schemas import topics as T

log = logging.getLogger(__name__)

MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
CONTROLLER = "controller"  # the broker's own login to its controller listener (PLAIN)
# One principal per role; `admin` is a super user (topics, ACLs, the CLI at the shell).
ROLES: tuple[str, ...] = (ADMIN, "producer", "stream", "speed", "aggregate", "dashboard")
SECURITY_DIR = "security"
FORMATTED_MARK = "formatted-secure"
TOKENS = {"aggregate": ("api_token", "api.token"), "dashboard": ("dashboard_token",
                                                                 "dashboard.token")}


class SecurityError(RuntimeError):
    """The security material could not be made or applied; str() says why (never a secret)."""


# --- ACLs: what each role may do -------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    """One ALLOW ACL: `operation` on a topic, group or the cluster, for a role's principal."""

    resource: str  # "topic", "group" or "cluster"
    name: str
    operation: str  # READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS, ALTER_CONFIGS, ...
    prefixed: bool = False


def _topics(op: str, names: Iterable[str], prefix: str) -> list[Grant]:
    return [Grant("topic", prefix + n, op) for n in names]


def role_acls(prefix: str = "") -> dict[str, list[Grant]]:
    """The least each role needs, on the topics named `prefix + name` (tests prefix them).

    READ on a topic implies DESCRIBE (metadata, offsets), WRITE implies DESCRIBE and, since Kafka
    3.0, the idempotent producer's right. Consumer groups: the ones each process names (a
    throwaway `read-…` group for read-to-end readers never commits, but librdkafka may look it up).
    """
    faust = f"{prefix}recsys-aggregate"
    return {
        "producer": _topics("WRITE", (T.SALES, T.SALES_DLQ), prefix),
        "stream": [
            *_topics("READ", (T.SALES, T.FEEDBACK, T.MODEL_READY, T.MODEL_FACTORS), prefix),
            *_topics("WRITE", (T.SALES_DLQ, T.MODEL_READY, T.RECOMMENDATIONS,
                               T.RECOMMENDATIONS_SHADOW, T.GRAPH_EDGES, T.MODEL_FACTORS), prefix),
            Grant("group", "spark-kafka-source-", "READ", prefixed=True),
            Grant("group", "recsys-stream-", "READ", prefixed=True),
            Grant("group", "read-", "READ", prefixed=True),
        ],
        "speed": [
            *_topics("READ", (T.SALES, T.MODEL_FACTORS, T.SPEED_STATE), prefix),
            *_topics("WRITE", (T.RECOMMENDATIONS, T.SPEED_STATE), prefix),
            Grant("group", "recsys-speed", "READ", prefixed=True),
        ],
        "aggregate": [
            *_topics("READ", (T.SALES, T.SALES_DLQ, T.MODEL_READY, T.RECOMMENDATIONS,
                              T.RECOMMENDATIONS_SHADOW), prefix),
            *_topics("WRITE", (T.FEEDBACK, T.SALES_DLQ), prefix),
            # Faust's own topics (table changelogs, the assignor's leader topic): it creates,
            # reads and writes them; nothing else matches the prefix.
            *[Grant("topic", faust, op, prefixed=True)
              for op in ("CREATE", "READ", "WRITE", "DESCRIBE_CONFIGS")],
            Grant("group", faust, "READ", prefixed=True),
        ],
        "dashboard": [
            *_topics("READ", (T.MODEL_READY, T.RECOMMENDATIONS, T.RECOMMENDATIONS_SHADOW,
                              T.GRAPH_EDGES, T.FEEDBACK, T.SALES_DLQ, T.SALES), prefix),
            Grant("group", "recsys-dashboard-", "READ", prefixed=True),
        ],
    }


def acl_bindings(grants: Mapping[str, list[Grant]]) -> list[Any]:
    """confluent-kafka `AclBinding`s for `grants` (role -> grants), principal `User:<role>`."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    out = []
    for role, role_grants in grants.items():
        for g in role_grants:
            out.append(AclBinding(
                ResourceType[g.resource.upper()], g.name,
                ResourcePatternType.PREFIXED if g.prefixed else ResourcePatternType.LITERAL,
                f"User:{role}", "*", AclOperation[g.operation], AclPermissionType.ALLOW))
    return out


# --- the local broker's material -------------------------------------------------------------------

@dataclass(frozen=True)
class Material:
    """The files of a secured local broker, under `<broker folder>/security/`."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def keystore(self) -> Path:
        """The broker's private key and certificate chain, PEM (Kafka's ssl.keystore.type=PEM)."""
        return self.folder / "broker.pem"

    @property
    def argfile(self) -> Path:
        return self.folder / "format.args"

    def password_file(self, user: str) -> Path:
        return self.folder / f"{user}.password"

    def password(self, user: str) -> SecretStr:
        return SecretStr(self.password_file(user).read_text().strip())

    def token_file(self, role: str) -> Path:
        return self.folder / TOKENS[role][1]

    @property
    def formatted_mark(self) -> Path:
        return self.folder / FORMATTED_MARK


def material(broker_dir: Path) -> Material:
    return Material(Path(broker_dir).absolute() / SECURITY_DIR)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600 from the first byte)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def prepare(broker_dir: Path) -> Material:
    """CA, broker certificate, passwords and tokens, made once; the folder is 0700."""
    m = material(broker_dir)
    m.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(Path(broker_dir).absolute(), 0o700)  # the data (every purchase) too
    os.chmod(m.folder, 0o700)
    for user in (*ROLES, CONTROLLER):
        if not m.password_file(user).exists():
            write_private(m.password_file(user), secrets.token_urlsafe(24) + "\n")
    for role in TOKENS:
        if not m.token_file(role).exists():
            write_private(m.token_file(role), secrets.token_urlsafe(32) + "\n")
    if not (m.ca.exists() and m.keystore.exists()):
        _certificates(m)
    return m


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise SecurityError("no `openssl` on PATH: install it (`make setup` does) to secure the "
                            "local broker")
    done = subprocess.run([exe, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SecurityError(f"openssl {args[0]} failed: {done.stderr.strip()[-400:]}")


def _certificates(m: Material) -> None:
    """A CA (10 years) and the broker's certificate (2 years) for 127.0.0.1 and localhost."""
    old = os.umask(0o077)
    try:
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
                 "-subj", "/CN=recsys local CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=m.folder)
        _openssl("req", *ec, "-keyout", "broker.key", "-out", "broker.csr",
                 "-subj", "/CN=127.0.0.1", cwd=m.folder)
        (m.folder / "broker.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "broker.crt", "-days", "730",
                 "-extfile", "broker.ext", cwd=m.folder)
        key = (m.folder / "broker.key").read_text()
        chain = (m.folder / "broker.crt").read_text() + m.ca.read_text()
        write_private(m.keystore, key + chain)
        for leftover in ("broker.key", "broker.csr", "broker.ext", "ca.srl"):
            (m.folder / leftover).unlink(missing_ok=True)
    finally:
        os.umask(old)
    log.info("made a CA and a broker certificate in %s", m.folder)


def _jaas(module: str, user: str, password: SecretStr, **extra: SecretStr) -> str:
    more = "".join(f' {k}="{v.get_secret_value()}"' for k, v in extra.items())
    return (f'{module} required username="{user}" '
            f'password="{password.get_secret_value()}"{more};')


SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule"


def broker_properties(broker_dir: Path, port: int, controller_port: int) -> dict[str, str]:
    """What a secured broker's server.properties changes or adds (see the module docstring)."""
    m = material(broker_dir)
    controller_pw = m.password(CONTROLLER)
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            _jaas(SCRAM_LOGIN, ADMIN, m.password(ADMIN)),
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config":
            _jaas(PLAIN_LOGIN, CONTROLLER, controller_pw, user_controller=controller_pw),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(m.keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(m.ca),
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.client.auth": "none",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{ADMIN};User:{CONTROLLER}",
    }


def format_argfile(broker_dir: Path, java_args: list[str]) -> Path:
    """A Java argument file (0600) with `java_args` and one `--add-scram` per role, so the
    passwords never appear on a command line (`ps` shows `java @file`)."""
    m = material(broker_dir)
    scram = []
    for role in ROLES:
        scram += ["--add-scram",
                  f"{MECHANISM}=[name={role},password={m.password(role).get_secret_value()}]"]
    # token_urlsafe passwords hold no quote, comma, bracket or space: no escaping is needed.
    write_private(m.argfile, "\n".join(f'"{a}"' for a in [*java_args, *scram]) + "\n")
    return m.argfile


def check_formatted(broker_dir: Path, formatted: bool) -> None:
    """A folder formatted without SCRAM users cannot be secured afterwards: say so."""
    m = material(broker_dir)
    if formatted and not m.formatted_mark.exists():
        raise SecurityError(
            f"{broker_dir} was formatted without security (no SCRAM users): delete it, or start "
            "with RECSYS_BROKER_SECURE=false")


def mark_formatted(broker_dir: Path, ok: bool = True) -> None:
    """After the format ran: the argument file goes; `ok`, the folder is marked secured."""
    material(broker_dir).argfile.unlink(missing_ok=True)
    if ok:
        material(broker_dir).formatted_mark.write_text("SCRAM users created at format time\n")


def admin_client_config(broker_dir: Path, bootstrap: str) -> dict[str, Any]:
    """librdkafka options for the launcher's own admin connection (readiness, ACLs)."""
    m = material(broker_dir)
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM, "sasl.username": ADMIN,
            "sasl.password": m.password(ADMIN).get_secret_value(),
            "ssl.ca.location": str(m.ca)}


def apply_acls(broker_dir: Path, bootstrap: str, prefix: str = "",
               timeout: float = 30.0) -> int:
    """Create every role's ACLs (idempotent: an existing binding is fine); returns how many."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    bindings = acl_bindings(role_acls(prefix))
    admin = AdminClient({**admin_client_config(broker_dir, bootstrap), "log_level": 0})
    try:
        for fut in admin.create_acls(bindings, request_timeout=timeout).values():
            fut.result(timeout=timeout)
    except KafkaException as exc:
        raise SecurityError(f"creating the roles' ACLs failed: {exc.args[0]}") from None
    log.info("ACLs in place: %d bindings for roles %s", len(bindings),
             ", ".join(role_acls(prefix)))
    return len(bindings)


# --- clients ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates, resolved from the settings; `password` stays a SecretStr."""

    protocol: str = "PLAINTEXT"
    mechanism: str = MECHANISM
    username: str = ""
    password: SecretStr = SecretStr("")
    ca_file: Path | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")


def local_material(settings: Settings) -> Material:
    """The local broker's material (`recsys broker start` keeps it in <data_dir>/kafka)."""
    return material(settings.data_dir / "kafka")


def _read_password(path: Path, setting: str) -> SecretStr:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(f"bad setting {setting}={str(path)!r}: allowed: a readable file "
                            f"holding the password ({exc.strerror})") from None
    if not value:
        raise SettingsError(f"bad setting {setting}={str(path)!r}: the file is empty")
    return SecretStr(value)


def client_security(settings: Settings) -> ClientSecurity:
    """The credentials every client of this process uses (see the module docstring)."""
    proto = settings.kafka_security_protocol
    if proto is None and not settings.broker_secure:
        return ClientSecurity()
    local = settings.broker_secure and proto in (None, "SASL_SSL")
    username = settings.kafka_sasl_username or (ADMIN if local else "")
    ca = settings.kafka_ssl_ca_file
    if local and ca is None:
        ca = local_material(settings).ca
    password = settings.kafka_sasl_password
    if settings.kafka_sasl_password_file is not None:
        password = _read_password(settings.kafka_sasl_password_file,
                                  f"{ENV_PREFIX}KAFKA_SASL_PASSWORD_FILE")
    elif not password.get_secret_value() and local:
        file = local_material(settings).password_file(username)
        if not file.exists():
            raise SettingsError(
                f"bad setting {ENV_PREFIX}BROKER_SECURE=true: no password for user {username!r} "
                f"in {file.parent} (start the local broker first, `recsys broker start`, or set "
                f"{ENV_PREFIX}KAFKA_SASL_USERNAME and {ENV_PREFIX}KAFKA_SASL_PASSWORD_FILE)")
        password = _read_password(file, f"{ENV_PREFIX}KAFKA_SASL_PASSWORD_FILE")
    return ClientSecurity(proto or "SASL_SSL", settings.kafka_sasl_mechanism, username,
                          password, ca)


def role_env(settings: Settings, role: str) -> dict[str, str]:
    """Environment for a process the launcher starts as `role` (stream, speed, aggregate,
    dashboard, producer): on the local secured broker with no client settings of the user's, that
    role's principal and, for the HTTP servers, their token; otherwise nothing (the process reads
    the same settings as the launcher). Secrets travel as file paths, tokens as values (a
    process's environment is readable by its owner only)."""
    if not settings.broker_secure or settings.kafka_security_protocol is not None:
        return {}
    m = local_material(settings)
    env = {
        f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        f"{ENV_PREFIX}KAFKA_SASL_MECHANISM": MECHANISM,
        f"{ENV_PREFIX}KAFKA_SASL_USERNAME": role,
        f"{ENV_PREFIX}KAFKA_SASL_PASSWORD": "",
        f"{ENV_PREFIX}KAFKA_SASL_PASSWORD_FILE": str(m.password_file(role)),
        f"{ENV_PREFIX}KAFKA_SSL_CA_FILE": str(settings.kafka_ssl_ca_file or m.ca),
    }
    if role in TOKENS:
        field, _ = TOKENS[role]
        given: SecretStr = getattr(settings, field)
        token = given.get_secret_value() or m.token_file(role).read_text().strip()
        env[f"{ENV_PREFIX}{field.upper()}"] = token
    return env


def token_problem(settings: Settings, field: str, serves: str) -> str | None:
    """The line refusing to start an HTTP server whose token `field` is empty while Kafka is
    secured: a secured pipeline must not hand `serves` to anyone who reaches the port."""
    if settings.secured and not getattr(settings, field).get_secret_value():
        return (f"{ENV_PREFIX}{field.upper()} is empty while Kafka is secured: {serves} to "
                "anyone who reaches its port; set a token of at least 16 characters (`recsys "
                "up` and `recsys demo` pass a generated one)")
    return None


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value this process knows (to mask them): settings and resolved password."""
    out = [settings.kafka_sasl_password.get_secret_value(), settings.api_token.get_secret_value(),
           settings.dashboard_token.get_secret_value()]
    try:
        out.append(client_security(settings).password.get_secret_value())
    except SettingsError:
        pass
    return [s for s in out if s]


def redact(text: str, settings: Settings | None = None, extra: Iterable[str] = ()) -> str:
    """`text` with every known secret replaced by `***` (for error lines built from client
    messages, which we do not control)."""
    for s in [*(secrets_of(settings) if settings is not None else []), *extra]:
        if s:
            text = text.replace(s, "***")
    return text
