"""Progress bars write whole lines, not carriage-return redraws, when output is a log file."""

import io

from deblur.core.progress import progress


def test_redirected_progress_writes_one_line_per_refresh():
    log = io.StringIO()  # not a terminal
    for _ in progress(range(5), desc="work", file=log, mininterval=0, miniters=1):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("work:") for line in lines)
    assert "5/5" in lines[-1]
