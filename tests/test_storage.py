import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest

from imgprep import ImgprepError
from imgprep.formats.storage import LmdbWriter, Reader, detect_backend, open_writer
from test_faults import tmpfs


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_writer_and_reader_round_trip_in_key_order(tmp_path, backend):
    writer = open_writer(tmp_path / "db", backend)
    writer.put_batch([(b"00000002_c", b"3"), (b"00000000_a", b"1")])
    writer.put_batch([(b"00000001_b", b"2")])
    writer.close()
    assert detect_backend(tmp_path / "db") == backend
    with Reader(tmp_path / "db") as reader:
        assert list(reader.items()) == [(b"00000000_a", b"1"), (b"00000001_b", b"2"), (b"00000002_c", b"3")]
        assert list(reader.items(start=b"00000001")) == [(b"00000001_b", b"2"), (b"00000002_c", b"3")]
        assert reader.last_key() == b"00000002_c" and len(reader) == 3 and reader.get(b"00000001_b") == b"2"
        with Reader(tmp_path / "db") as second:  # readers in one process share the handle
            assert second.get(b"00000000_a") == b"1"
        assert reader.get(b"00000000_a") == b"1"  # still open after the other reader closed


def test_lmdb_append_order_and_growth(tmp_path):
    writer = LmdbWriter(tmp_path / "db", map_size=64 << 10)
    for i in range(50):
        writer.put_batch([(f"{i:08d}_x".encode(), bytes(10_000))])
    writer.put_batch([(b"00000007_y", b"out of order")])  # not increasing: inserted normally
    assert writer.map_growths >= 3
    writer.close()
    with Reader(tmp_path / "db") as reader:
        keys = list(reader.keys())
    assert len(keys) == 51 and keys == sorted(keys)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_records_added_from_buffers_are_kept_only_once_committed(tmp_path, backend):
    """A build adds each chunk's records straight from its workers' shared memory (buffers that are
    reused right after) and commits every --txn-size records: what was added is written as it was
    at the time, and what was not committed when the writer closes is not kept."""
    area = bytearray(300_000)
    commits = []
    writer = open_writer(tmp_path / "db", backend, map_size=256 << 10, before_commit=lambda: commits.append(1))
    expected = []
    for i in range(12):
        area[:] = bytes([i]) * len(area)  # the area takes the next chunk's records
        with memoryview(area) as view:
            writer.add([(f"{i:08d}_x".encode(), view[:200_000 + i])])
        expected.append((f"{i:08d}_x".encode(), bytes([i]) * (200_000 + i)))
        if i % 5 == 4:
            writer.commit()
    area[:] = b"\xff" * len(area)
    writer.add([(b"00000099_lost", b"never committed")])
    writer.close()
    with Reader(tmp_path / "db") as reader:
        assert list(reader.items()) == expected[:10]
    if backend == "lmdb":  # the 256 KB map cannot hold five 200 KB records: it commits early to grow
        assert len(commits) > 2 and writer.map_growths
    else:
        assert len(commits) == 2


def test_lmdb_commits_early_to_grow_calling_before_commit_first(tmp_path):
    """The map cannot grow while a transaction is open: `add` commits what it holds first, and the
    build's failure log (before_commit) is made durable before that commit, as before any other."""
    order = []
    writer = LmdbWriter(tmp_path / "db", map_size=64 << 10, before_commit=lambda: order.append(
        ("before", writer.env.info()["last_pgno"])))
    for i in range(8):
        writer.add([(f"{i:08d}_x".encode(), bytes(40_000))])
    early = len(order)
    writer.commit()
    writer.close()
    assert early >= 2, order  # 8 x 40 KB never fit the 64 KB map in one transaction
    assert [pgno for _, pgno in order] == sorted(set(pgno for _, pgno in order))  # each commit grew the file
    with Reader(tmp_path / "db") as reader:
        assert len(reader) == 8


def test_detect_backend_errors(tmp_path):
    with pytest.raises(ImgprepError, match="does not exist"):
        detect_backend(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgprepError, match="neither an LMDB"):
        detect_backend(tmp_path / "empty")


# A child process that writes 196 KB records through the LMDB writer until it fails: it prints how
# many batches committed, then the error, as the CLI would (a SIGBUS would kill it without a word).
FILL = """
import sys
from imgprep import ImgprepError
from imgprep.formats.storage import LmdbWriter
writer = LmdbWriter(sys.argv[1])
batches = 0
try:
    for i in range(int(sys.argv[2])):
        writer.put_batch([(f"{i * 10 + j:08d}_x".encode(), bytes([i % 251]) * 196_000) for j in range(10)])
        batches += 1
    writer.close()
except ImgprepError as e:
    print(batches)
    sys.exit(f"Error: {e}")
print(batches)
"""


def fill(db, batches, preexec_fn=None):
    return subprocess.run([sys.executable, "-c", FILL, str(db), str(batches)], capture_output=True, text=True,
                          preexec_fn=preexec_fn)


def test_lmdb_writer_on_a_too_small_disk_fails_clearly_never_with_sigbus(tmp_path):
    """LMDB writes through a writable map; its file space is reserved before the map covers it, so
    a full disk is a clear error at reservation time, and what committed stays readable and
    resumable."""
    with tmpfs(tmp_path / "small", "size=20m") as disk:
        result = fill(disk / "db", 100)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (result.returncode, result.stderr)
        assert "disk is full" in result.stderr and "--resume" in result.stderr, result.stderr
        committed = int(result.stdout)
        assert 8 <= committed <= 10  # 1.96 MB per batch into 20 MB: the reservation uses the disk to its end
        with Reader(disk / "db") as reader:
            assert len(reader) == committed * 10
            assert all(value == bytes([int(key[:8]) // 10 % 251]) * 196_000 for key, value in reader.items())
        subprocess.run(["mount", "-o", "remount,size=100m", str(disk)], check=True)
        writer = LmdbWriter(disk / "db")
        assert writer.last_key == f"{committed * 10 - 1:08d}_x".encode()
        writer.put_batch([(b"99999999_z", b"after")])
        writer.close()
        with Reader(disk / "db") as reader:
            assert len(reader) == committed * 10 + 1


def test_lmdb_writer_under_a_file_size_limit_fails_clearly(tmp_path):
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    result = fill(tmp_path / "db", 100, preexec_fn=cap)
    assert result.returncode == 1 and "file-size limit" in result.stderr, (result.returncode, result.stderr)
    assert 3 <= int(result.stdout) < 5
    assert (tmp_path / "db" / "data.mdb").stat().st_size <= 8 << 20



KEEP_WRITING = """
import sys
from imgprep.formats.storage import LmdbWriter
writer = LmdbWriter(sys.argv[1], map_size=1 << 20)
for i in range(40):
    writer.put_batch([(f"{i * 4 + j:08d}_x".encode(), bytes([i % 251]) * 196_000) for j in range(4)])
    print(i, flush=True)
"""


def test_lmdb_writer_killed_mid_batch_keeps_every_committed_batch_and_resumes(tmp_path):
    """kill -9 while records are written in place: what committed is intact, the batch in progress
    is gone, and a new writer continues after the last key (as --resume does)."""
    db = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-c", KEEP_WRITING, str(db)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) == 11:
            break
    proc.kill()
    proc.wait()
    with Reader(db) as reader:
        keys = list(reader.keys())
        assert len(keys) % 4 == 0 and 48 <= len(keys) < 160  # whole batches only
        assert all(v == bytes([int(k[:8]) // 4 % 251]) * 196_000 for k, v in reader.items())
    writer = LmdbWriter(db)
    assert writer.last_key == keys[-1]
    for i in range(len(keys) // 4, 40):
        writer.put_batch([(f"{i * 4 + j:08d}_x".encode(), bytes([i % 251]) * 196_000) for j in range(4)])
    writer.close()
    with Reader(db) as reader:
        assert [(k, v[:1]) for k, v in reader.items()] == [(f"{n:08d}_x".encode(), bytes([n // 4 % 251]))
                                                          for n in range(160)]

def test_lmdb_map_is_always_reserved_and_close_gives_the_rest_back(tmp_path):
    writer = LmdbWriter(tmp_path / "db", map_size=1 << 20)
    data = tmp_path / "db" / "data.mdb"
    for i in range(30):
        writer.put_batch([(f"{i:08d}_x".encode(), bytes(200_000))])  # raw-sized records: written in place
        assert writer.in_place
        st = data.stat()
        # every byte the map covers is allocated: no store through the map can meet a hole
        assert st.st_size == writer.map_size and st.st_blocks * 512 >= st.st_size
    assert writer.map_growths >= 2
    writer.close()
    writer.close()  # a second close does nothing
    info = lmdb.open(str(tmp_path / "db"), readonly=True)
    used = (info.info()["last_pgno"] + 1) * info.stat()["psize"]
    info.close()
    assert data.stat().st_size == used < 8 << 20


def test_lmdb_writes_small_records_through_lmdbs_default_path(tmp_path):
    writer = LmdbWriter(tmp_path / "db")
    writer.put_batch([(f"{i:08d}_x".encode(), bytes(25_000)) for i in range(10)])  # JPEG-sized
    assert writer.in_place is False and not writer.env.flags()["writemap"]
    writer.put_batch([(f"{i:08d}_x".encode(), bytes(200_000)) for i in range(10, 12)])  # the first batch decided
    assert writer.in_place is False
    writer.close()
    with Reader(tmp_path / "db") as reader:
        assert len(reader) == 12



def test_lmdb_background_writeback_leaves_ctrl_c_to_the_main_thread_and_ends_with_close(tmp_path):
    writer = LmdbWriter(tmp_path / "db")
    writer.put_batch([(b"00000000_a", bytes(300_000))])
    flushers = [t for t in threading.enumerate() if t.name == "imgprep-lmdb-flush"]
    assert len(flushers) == 1
    status = Path(f"/proc/self/task/{flushers[0].native_id}/status").read_text()
    blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M)[1], 16)
    assert blocked & (1 << (signal.SIGINT - 1))  # SIGINT reaches the main thread, which stops the build
    writer.put_batch([(b"00000001_a", bytes(300_000))])
    writer.close()
    assert not flushers[0].is_alive()
    assert not [t for t in threading.enumerate() if t.name == "imgprep-lmdb-flush"]

def test_writer_benchmark_prints_the_writers_side_by_side(tmp_path):
    bench = Path(__file__).parent.parent / "benchmarks" / "bench_writer.py"
    result = subprocess.run([sys.executable, str(bench), "--raw", "20", "--jpeg", "50", "--rounds", "1",
                             "--txn-size", "10", "--workdir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| ([^|]+) \| ([\d,]+) \| [\d,]+-[\d,]+ \| ([\d.]+) \| [\d.]+-[\d.]+ \|", result.stdout, re.M)
    names = [name for name, _, _ in rows]
    for name in ("imgprep writer, LMDB", "previous imgprep writer, LevelDB"):  # raw and JPEG, in both regimes
        assert names.count(name) == 2 and names.count(f"{name}, page cache recycled") == 2, names
    assert len(rows) == 16 and all(float(rate.replace(",", "")) > 0 for _, rate, _ in rows)
    assert not [p.name for p in tmp_path.iterdir()]  # the scratch file and the databases are gone
