"""A private PostgreSQL server for the test session: `initdb` and `pg_ctl` in a temporary dir.

It listens on a Unix socket in that dir only (no TCP port at all), trusts local connections
and runs without fsync (the tests need its semantics, not its durability). As root it runs
as the unprivileged `postgres` user (`nobody` where there is none) through `setpriv`: the
server refuses to run as root. Each test gets a database of its own (`new_database`).

The binaries are looked up on PATH, then in Debian's /usr/lib/postgresql/<version>/bin
(`scripts/test` installs the `postgresql` package); where there are none, the tests that
need the server are skipped, saying so.

`pause` and `resume` stop the server and start it again on the same data (a database outage:
tests/integration/test_database_outage.py, on a server of the test's own).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "atomizer"


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are, or None."""
    explicit = os.environ.get("ATOMIZERD_TEST_PG_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if all((d / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _run_as() -> tuple[list[str], int, int] | None:
    """The command prefix that drops root, and the uid/gid it drops to (None: not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        return prefix, pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root, and no unprivileged user to run PostgreSQL as")


class PostgresServer:
    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        """`durable`: a commit is on disk when it returns (synchronous_commit on), so an
        `immediate` stop (a crash of the server) loses nothing committed; without it the
        last commits may be lost then."""
        self.bindir = bindir
        self.durable = durable
        # Short: the socket's path ("<dir>/.s.PGSQL.5432") must fit in 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="azd-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log = self.base / "server.log"
        self._names = itertools.count(1)
        self.running = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        drop = _run_as()
        return [*(drop[0] if drop else []), str(self.bindir / tool), *args]

    def start(self) -> PostgresServer:
        self.socket_dir.mkdir()
        drop = _run_as()
        if drop is not None:
            _, uid, gid = drop
            os.chmod(self.base, 0o700)
            for p in (self.base, self.socket_dir):
                os.chown(p, uid, gid)
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        subprocess.run(
            self._cmd(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ),
            check=True,
            capture_output=True,
            env=env,
            cwd=self.base,
        )
        self._options = " ".join(
            [
                "-c listen_addresses=''",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=" + ("on" if self.durable else "off"),
                "-c full_page_writes=off",
                "-c max_connections=60",
                "-c shared_buffers=32MB",
            ]
        )
        self.resume()
        return self

    def resume(self) -> None:
        """Starts the server (again, after `pause`) on the same data and socket."""
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        result = subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                self._options,
                "-w",
                "start",
            ),
            capture_output=True,
            env=env,
            cwd=self.base,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start: {result.stderr.decode(errors='replace')}\n"
                f"{self.server_log()}"
            )
        self.running = True

    def pause(self, mode: str = "fast") -> None:
        """Stops the server, keeping its data, as an operator's restart or a crash would:
        `fast` ends every client's session (they see "terminating connection due to
        administrator command"), `immediate` just goes away. `resume` starts it again."""
        result = subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"),
            capture_output=True,
            cwd=self.base,
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not stop: {result.stderr.decode(errors='replace')}")
        self.running = False

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def url(self, database: str) -> str:
        """The store URL of one database (peewee's form; the socket dir as `host`)."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            dbname="postgres", user=SUPERUSER, host=str(self.socket_dir), autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t{next(self._names)}"
        # FILE_COPY: quicker than the default WAL_LOG for an empty database without fsync.
        self.admin(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("/")[3].split("?")[0]
        # WITH (FORCE): a connection a failed test left open does not keep it.
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.running:
            subprocess.run(
                self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                capture_output=True,
                cwd=self.base,
            )
            self.running = False
        shutil.rmtree(self.base, ignore_errors=True)
