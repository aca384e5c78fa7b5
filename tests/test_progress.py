import io

from imgprep.prepare.progress import Progress, format_duration


def test_progress_lines_count_rate_eta_and_failures():
    stream = io.StringIO()
    progress = Progress("stage", 1000, stream=stream, interval=0, done=400, failures=2)
    progress.start -= 10.0  # as if 10 s had passed
    progress.update(100, failures=1)
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("stage: 500/1,000 (50.0%)")
    assert "10 img/s" in line  # the 400 done before this run do not inflate the rate
    assert "ETA 0:00:50" in line and "failures 3" in line
    progress.finish("stage: done")
    assert stream.getvalue().endswith("stage: done\n")


def test_format_duration():
    assert format_duration(3725) == "1:02:05" and format_duration(-1) == "0:00:00"
