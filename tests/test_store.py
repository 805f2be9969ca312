"""The one results store behind sweep and bench: torn-line repair, no duplicate rows, the lock, stale
rows moved aside, and the results already committed under results/ still loading unchanged."""

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llc_bench import bench, sweep
from llc_bench.jobs.store import ResultsStore
from llc_bench.types import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SWEEP_HEADER = ["cell_id", "seed", "sampler", "data.n", *sweep.METRICS, "status", "warnings", "error",
                "versions", "fingerprint"]


def _sweep_store(path: Path) -> ResultsStore:
    return sweep.ResultsCSV(path, SWEEP_HEADER)


def _bench_store(path: Path) -> ResultsStore:
    return bench.Scoreboard(path, {}).store


USERS = {"sweep": (_sweep_store, "cell_id"), "bench": (_bench_store, "instance")}


@pytest.fixture(params=list(USERS))
def user(request):
    """(make_store(path), make_row(id, sampler, llc)) of one of the store's two users."""
    make_store, id_column = USERS[request.param]

    def make_row(ident: str, sampler: str, llc: str) -> dict:
        store = make_store(Path("/nonexistent/never-written.csv"))
        return {**dict.fromkeys(store.header, ""), id_column: ident, "sampler": sampler, "llc_mean": llc}

    return make_store, make_row


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_a_torn_last_line_is_cut_away_and_the_next_write_is_clean(user, tmp_path):
    make_store, make_row = user
    path = tmp_path / "r.csv"
    store = make_store(path)
    assert store.append([make_row("a", "sgld", "1.5"), make_row("b", "sgld", "2.5")]) == 2
    complete = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b"c,sgld,3.")  # a write cut short: no newline
    assert [r["llc_mean"] for r in make_store(path).read()] == ["1.5", "2.5"]
    assert path.read_bytes() == complete  # truncated back to the last complete line
    with path.open("ab") as fh:
        fh.write(b"c,sg")
    assert make_store(path).append([make_row("c", "sgld", "3.5")]) == 1
    rows = list(csv.DictReader(path.open()))
    assert [(r[store.key[0]], r["llc_mean"]) for r in rows] == [("a", "1.5"), ("b", "2.5"), ("c", "3.5")]
    assert len(_lines(path)) == 4 and path.read_text().endswith("\n")


def test_no_row_is_written_twice(user, tmp_path):
    make_store, make_row = user
    path = tmp_path / "r.csv"
    store = make_store(path)
    assert store.append([make_row("a", "sgld", "1"), make_row("a", "hmc", "2")]) == 2
    # the same keys again, from a fresh store (a resumed run) and twice within one batch
    again = make_store(path)
    assert again.append([make_row("a", "sgld", "9"), make_row("b", "sgld", "3"), make_row("b", "sgld", "4")]) == 1
    rows = again.read()
    assert [(r["sampler"], r["llc_mean"]) for r in rows] == [("sgld", "1"), ("hmc", "2"), ("sgld", "3")]
    assert _lines(path)[0] == ",".join(store.header) and len(_lines(path)) == 4


def test_a_writer_waits_for_the_lock(user, tmp_path):
    make_store, make_row = user
    path = tmp_path / "r.csv"
    make_store(path).append([make_row("a", "sgld", "1")])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"fh = open({str(path)!r}, 'a+b'); fcntl.flock(fh.fileno(), fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(1.5)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        assert make_store(path).append([make_row("b", "sgld", "2")]) == 1
        waited = time.perf_counter() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 0.8  # blocked until the other process let go
    assert [r["llc_mean"] for r in make_store(path).read()] == ["1", "2"]


def test_stale_rows_move_aside_and_the_rest_stay(user, tmp_path):
    make_store, make_row = user
    path = tmp_path / "r.csv"
    store = make_store(path)
    store.append([make_row("a", "sgld", "1"), make_row("a", "hmc", "2"), make_row("b", "sgld", "3")])
    moved = store.move_aside(lambda r: r["sampler"] == "sgld")
    assert [r["llc_mean"] for r in moved] == ["1", "3"]
    assert [r["llc_mean"] for r in store.read()] == ["2"]
    aside = tmp_path / "r.stale.csv"
    assert store.stale_path == aside
    assert [r["llc_mean"] for r in csv.DictReader(aside.open())] == ["1", "3"]
    store.append([make_row("a", "sgld", "5")])  # recomputed; a second move appends to the same file
    store.move_aside(lambda r: r["sampler"] == "sgld")
    assert [r["llc_mean"] for r in csv.DictReader(aside.open())] == ["1", "3", "5"]


def test_a_file_of_other_columns_is_refused(user, tmp_path):
    make_store, _ = user
    path = tmp_path / "r.csv"
    path.write_text("something,else\n1,2\n")
    with pytest.raises(ConfigError, match="other columns"):
        make_store(path).read()
    assert path.read_text() == "something,else\n1,2\n"


def test_only_declared_new_columns_are_migrated(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("id,sampler,x\na,s,1\n")
    store = ResultsStore(path, ["id", "sampler", "x", "new"], key=("id", "sampler"), added_columns=("new",))
    assert store.read() == [{"id": "a", "sampler": "s", "x": "1", "new": ""}]
    assert path.read_text() == "id,sampler,x\na,s,1\n"  # reading changes nothing
    store.append([{"id": "b", "sampler": "s", "x": "2", "new": "n"}])
    assert path.read_text() == "id,sampler,x,new\na,s,1,\nb,s,2,n\n"
    with pytest.raises(ConfigError, match="other columns"):
        ResultsStore(path, ["id", "sampler", "x", "new", "newer"], key=("id", "sampler")).read()


def test_rows_moved_aside_to_an_older_stale_file_migrate_it_first(tmp_path):
    """A .stale.csv written before a column was added gains it before new stale rows are appended."""
    path, stale = tmp_path / "r.csv", tmp_path / "r.stale.csv"
    path.write_text("id,sampler,x\na,s,1\nb,s,2\n")
    stale.write_text("id,sampler,x\nz,s,0\n")
    store = ResultsStore(path, ["id", "sampler", "x", "new"], key=("id", "sampler"), added_columns=("new",))
    moved = store.move_aside(lambda r: r["id"] == "a")
    assert [r["id"] for r in moved] == ["a"]
    assert stale.read_text() == "id,sampler,x,new\nz,s,0,\na,s,1,\n"
    assert path.read_text() == "id,sampler,x,new\nb,s,2,\n"


@pytest.mark.parametrize("name", ["dln_scoreboard.csv", "sg_auto/dln_scoreboard.csv",
                                  "sg_curvature/dln_scoreboard.csv", "finite_n_audit.csv"])
def test_committed_scoreboards_resume_and_gain_only_the_new_columns(name, tmp_path):
    source = ROOT / "results" / "benchmarks" / name
    path = tmp_path / Path(name).name
    shutil.copy(source, path)
    columns = bench.AUDIT_COLUMNS if name.startswith("finite_n_audit") else bench.COLUMNS
    board = bench.Scoreboard(path, {}, columns)
    expected = list(csv.DictReader(source.open()))
    assert expected and board.done == {(r["instance"], r["sampler"]) for r in expected}
    rows = board.store.read()
    assert path.read_bytes() == source.read_bytes()  # reading changes nothing
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected
    board.append([dict(rows[0])])  # a row already there: no row is written, the header may gain columns
    migrated = list(csv.DictReader(path.open()))
    assert [{k: r[k] for k in expected[0]} for r in migrated] == expected
    assert tuple(migrated[0]) == columns
    assert all(r[k] == "" for r in migrated for k in set(columns) - set(expected[0]))


def test_committed_sweep_csv_resumes_and_gains_only_the_new_columns(tmp_path):
    source = ROOT / "results" / "sweeps" / "llc_sweep_results.csv"
    spec = sweep.load_spec()
    path = tmp_path / "sweep.csv"
    shutil.copy(source, path)
    store = sweep.ResultsCSV(path, sweep.columns(spec))
    expected = list(csv.DictReader(source.open()))
    rows = store.read()
    assert path.read_bytes() == source.read_bytes()
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected
    assert store.append([]) == 0
    migrated = list(csv.DictReader(path.open()))
    assert [{k: r[k] for k in expected[0]} for r in migrated] == expected
    assert list(migrated[0]) == sweep.columns(spec)
