import pytest

from imgprep import ImgprepError
from imgprep.formats.storage import LmdbWriter, Reader, detect_backend, open_writer


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


def test_detect_backend_errors(tmp_path):
    with pytest.raises(ImgprepError, match="does not exist"):
        detect_backend(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgprepError, match="neither an LMDB"):
        detect_backend(tmp_path / "empty")
