"""Where a search keeps its trials: Optuna storages, and a plain file when Optuna is absent.

Every backend ends in the same records (one dict per trial), which ``lm.search_report``
turns into trials.csv, best_config.yaml, report.md and the plots:

    {"number", "state": COMPLETE|PRUNED|FAIL|RUNNING|WAITING, "value", "params",
     "duration_s", "steps", "intermediate": {step: val_loss}, "error"}

SQLite and several processes. Optuna's default SQLite set-up fails with ``database is
locked`` when two processes write at once: a deferred transaction that read first and
then wants to write cannot wait for the other writer (SQLite returns BUSY at once instead
of waiting, to avoid a deadlock). ``open_storage`` makes every transaction take the write
lock when it begins (``BEGIN IMMEDIATE``) and gives each connection a 60-second busy
timeout, so writers queue instead of failing; ``tests/test_search.py`` runs four processes
against one file. A journal file (``journal:PATH``) is the other way, and works on a
shared file system too; a server (PostgreSQL, MySQL) is the way for several machines.
"""
from __future__ import annotations

import json
import os
import time

SQLITE_TIMEOUT_S = 60
HEARTBEAT_S, GRACE_S = 60, 300   # a trial silent for 5 minutes (a killed machine) is failed
JOURNAL_SUFFIXES = (".journal", ".log")


def have_optuna() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def describe(url: str) -> str:
    """The storage URL without its password, for messages and the report."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url[len("journal:"):].removeprefix("//")
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return url
    return None


def _sqlite_write_lock_on_begin(engine) -> None:
    """Serialise SQLite transactions: BEGIN IMMEDIATE + busy timeout (SQLAlchemy's pysqlite recipe)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None          # let us emit BEGIN ourselves
        dbapi_conn.execute(f"PRAGMA busy_timeout = {SQLITE_TIMEOUT_S * 1000}")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()   # connections opened before the listeners existed are dropped


DRIVERS = {"postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2"), ("pg8000", "pg8000")),
           "mysql": (("MySQLdb", "mysqldb"), ("pymysql", "pymysql"), ("mysql.connector", "mysqlconnector"))}
INSTALL = {"postgresql": "pip install 'psycopg[binary]' (or psycopg2-binary)", "mysql": "pip install pymysql"}


def with_driver(url: str) -> str:
    """``postgresql://`` / ``mysql://`` with the first driver that is installed
    (``postgresql+psycopg2://...``); SQLAlchemy alone would insist on one of them."""
    import importlib.util
    scheme = url.split("://", 1)[0]
    if scheme not in DRIVERS:
        return url
    for module, name in DRIVERS[scheme]:
        try:
            if importlib.util.find_spec(module) is not None:
                return f"{scheme}+{name}://" + url.split("://", 1)[1]
        except (ImportError, ValueError):
            continue
    raise ImportError(f"a {scheme}:// storage needs a database driver: {INSTALL[scheme]}")


def open_storage(url: str):
    """An Optuna storage for ``url``: ``sqlite:///file.db``, ``journal:file.journal`` (or a path
    ending in .journal/.log), or any SQLAlchemy URL (``postgresql://user:pw@host/db``, ``mysql://...``)."""
    import optuna
    path = journal_path(url)
    if path is not None:
        from optuna.storages import JournalStorage
        try:
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
        except ImportError:   # Optuna 3.x names
            from optuna.storages import JournalFileOpenLock, JournalFileStorage as JournalFileBackend
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # an open(O_EXCL) lock file works on network file systems as well as local ones
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if url.startswith("sqlite"):
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}},
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        _sqlite_write_lock_on_begin(storage.engine)
        return storage
    return optuna.storages.RDBStorage(with_driver(url), engine_kwargs={"pool_pre_ping": True},
                                      heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


# --------------------------------------------------------------------------- records
def record_from_frozen(t) -> dict:
    state = t.state.name
    return {"number": t.number, "state": state,
            "value": t.value if state == "COMPLETE" else None,
            "params": dict(t.params), "duration_s": t.duration.total_seconds() if t.duration else None,
            "steps": t.user_attrs.get("steps"), "worker": t.user_attrs.get("worker"),
            "intermediate": {int(k): float(v) for k, v in sorted(t.intermediate_values.items())},
            "error": t.user_attrs.get("error") or ("interrupted" if state == "FAIL" else None)}


def counts_toward_budget(t) -> bool:
    """Trials that use up ``--n_trials``: finished ones (a failure the objective reported counts,
    so a search of failing trials ends) and running ones. A trial interrupted by Ctrl-C or a
    killed worker does not: its place is run again. Queued (WAITING) ones run first, when their
    turn comes."""
    state = t.state.name
    return state in ("COMPLETE", "PRUNED", "RUNNING") or (state == "FAIL" and "error" in t.user_attrs)


# --------------------------------------------------------------------------- without Optuna
class LocalTrial:
    """The part of ``optuna.Trial`` a search uses, for values drawn in advance."""

    def __init__(self, number: int, values: dict):
        self.number, self._values = number, values
        self.params, self.user_attrs, self.intermediate_values = {}, {}, {}

    def _get(self, name):
        self.params[name] = self._values[name]
        return self._values[name]

    def suggest_float(self, name, low, high, log=False):
        return self._get(name)

    def suggest_int(self, name, low, high, step=1, log=False):
        return self._get(name)

    def suggest_categorical(self, name, choices):
        return self._get(name)

    def report(self, value: float, step: int) -> None:
        self.intermediate_values[int(step)] = float(value)

    def should_prune(self) -> bool:
        return False    # pruners are Optuna's; the plain samplers train every trial to its budget

    def set_user_attr(self, key, value) -> None:
        self.user_attrs[key] = value


class LocalStudy:
    """Finished trials as JSON lines in one file (``trials.jsonl``), appended one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict] = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        self.records.append(json.loads(line))

    def n_done(self) -> int:
        return len(self.records)

    def add(self, trial: LocalTrial, state: str, value, t0: float, error: str | None = None) -> dict:
        rec = {"number": trial.number, "state": state, "value": value if state == "COMPLETE" else None,
               "params": trial.params, "duration_s": time.time() - t0, "steps": trial.user_attrs.get("steps"),
               "worker": trial.user_attrs.get("worker"), "intermediate": trial.intermediate_values, "error": error}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        return rec


def records_from_local(study: LocalStudy) -> list[dict]:
    out = []
    for r in study.records:
        r = dict(r)
        r["intermediate"] = {int(k): v for k, v in r.get("intermediate", {}).items()}
        out.append(r)
    return out
