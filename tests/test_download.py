"""LaMP downloads against a real HTTP server on 127.0.0.1: all-or-nothing, clear errors."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from fedhydra.common.data import load_split
from fedhydra.common.download import DEFAULT_BASE_URL, DownloadError, download, split_urls
from fedhydra.common.tasks import get_task

TWEET = get_task("LaMP_7")
MOVIE = get_task("LaMP_2M")


def _tweet_split() -> tuple[list, dict]:
    questions = [{"id": str(u), "input": TWEET.instruction(f"I am tired today, number {u}."),
                  "profile": [{"id": f"{u}0", "text": "sooo tired lol"}, {"id": f"{u}1", "text": "need coffee :)"}]}
                 for u in (10, 11, 12)]
    outputs = {"task": "LaMP_7", "golds": [{"id": str(u), "output": "so tired lol"} for u in (10, 11, 12)]}
    return questions, outputs


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test's folder, plus /fail500/..., /truncated/... and /slow/... misbehaviours."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/fail500/"):
            self.send_error(500, "Internal Server Error")
        elif self.path.startswith("/truncated/"):
            body = b'[{"id": "10", "input": '
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * 10))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
        elif self.path.startswith("/slow/"):
            time.sleep(1.5)
            try:
                self.send_error(404)
            except OSError:
                pass
        else:
            super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder) of a ThreadingHTTPServer on an ephemeral 127.0.0.1 port."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def _serve(served: Path, folder: str, split: str, questions, outputs) -> None:
    """Put a split where LaMP's site has it: <folder>/<split>/<split>_{questions,outputs}.json."""
    where = served / folder / split
    where.mkdir(parents=True, exist_ok=True)
    for name, value in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs)):
        if value is not None:
            (where / name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_urls_follow_lamp_site_layout():
    assert split_urls("LaMP_7", "dev") == [
        (f"{DEFAULT_BASE_URL}/LaMP_7/dev/dev_questions.json", "dev_questions.json"),
        (f"{DEFAULT_BASE_URL}/LaMP_7/dev/dev_outputs.json", "dev_outputs.json"),
    ]
    assert DEFAULT_BASE_URL == "https://ciir.cs.umass.edu/downloads/LaMP"
    assert split_urls("LaMP_2M", "train")[0][0] == f"{DEFAULT_BASE_URL}/LaMP_2/new/train/train_questions.json"
    assert split_urls("LaMP_2N", "dev")[1][0] == f"{DEFAULT_BASE_URL}/LaMP_2/dev/dev_outputs.json"
    assert split_urls("LaMP_3", "train", time_based=True)[1][0] == \
        f"{DEFAULT_BASE_URL}/time/LaMP_3/train/train_outputs.json"
    assert [name for _, name in split_urls("LaMP_5", "test")] == ["test_questions.json"]
    with pytest.raises(ValueError, match=r"no LaMP download for task 'LaMP_6'"):
        split_urls("LaMP_6", "dev")
    with pytest.raises(ValueError, match=r"unknown split 'validation'"):
        split_urls("LaMP_7", "validation")


def test_good_download_writes_both_files_that_load(server, tmp_path):
    base, served = server
    questions, outputs = _tweet_split()
    _serve(served, "LaMP_7", "dev", questions, outputs)
    dest = tmp_path / "dest" / "LaMP_7"
    written = download("LaMP_7", "dev", dest, base_url=base)
    assert written == [dest / "dev_questions.json", dest / "dev_outputs.json"]
    assert _listing(dest) == ["dev_outputs.json", "dev_questions.json"]  # no temporary leftovers
    assert (dest / "dev_questions.json").read_bytes() == (served / "LaMP_7/dev/dev_questions.json").read_bytes()
    data = load_split(dest)
    assert data.task.name == "LaMP_7" and [u.id for u in data.users] == ["10", "11", "12"]


def test_time_based_movie_test_split_has_questions_only(server, tmp_path):
    base, served = server
    questions = [{"id": "7", "input": MOVIE.instruction("Robots rebel."),
                  "profile": [{"id": "70", "description": "Aliens land.", "tag": "sci-fi"}]}]
    _serve(served, "time/LaMP_2/new", "test", questions, None)
    written = download("LaMP_2M", "test", tmp_path / "d", base_url=base, time_based=True)
    assert [p.name for p in written] == ["test_questions.json"]
    assert load_split(tmp_path / "d", task="LaMP_2M", require_golds=False).users[0].gold is None


def test_404_is_a_clear_error_and_dest_stays_empty(server, tmp_path):
    base, served = server
    questions, _ = _tweet_split()
    _serve(served, "LaMP_7", "dev", questions, None)  # the outputs file is missing on the server
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError) as caught:
        download("LaMP_7", "dev", dest, base_url=base)
    assert str(caught.value) == f"{base}/LaMP_7/dev/dev_outputs.json: HTTP 404 File not found"
    assert _listing(dest) == []


def test_dest_created_by_a_failed_download_is_removed(server, tmp_path):
    base, _ = server
    dest = tmp_path / "new" / "folder"
    with pytest.raises(DownloadError, match=r"HTTP 404"):
        download("LaMP_7", "dev", dest, base_url=base)
    assert not (tmp_path / "new").exists()


def test_http_500_is_a_clear_error(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match=rf"^{base}/fail500/LaMP_7/dev/dev_questions\.json: HTTP 500"):
        download("LaMP_7", "dev", tmp_path / "d", base_url=base + "/fail500")
    assert _listing(tmp_path / "d") == []


def test_malformed_json_is_refused_and_dest_stays_empty(server, tmp_path):
    base, served = server
    questions, _ = _tweet_split()
    _serve(served, "LaMP_7", "dev", questions, '{"task": "LaMP_7", "golds": [')
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError) as caught:
        download("LaMP_7", "dev", dest, base_url=base)
    message = str(caught.value)
    assert message.startswith("downloaded data is not valid LaMP_7: ")
    assert f"{base}/LaMP_7/dev/dev_outputs.json: not valid JSON" in message
    assert _listing(dest) == []


def test_data_of_another_task_is_refused(server, tmp_path):
    base, served = server
    questions, outputs = _tweet_split()
    _serve(served, "LaMP_2/new", "dev", questions, outputs)  # tweets where movie tags should be
    with pytest.raises(DownloadError, match=r"file is for task 'LaMP_7' but task 'LaMP_2M' was asked for"):
        download("LaMP_2M", "dev", tmp_path / "d", base_url=base)
    assert _listing(tmp_path / "d") == []


def test_truncated_download_is_refused(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match=r"dev_questions\.json: truncated download"):
        download("LaMP_7", "dev", tmp_path / "d", base_url=base + "/truncated")
    assert _listing(tmp_path / "d") == []


def test_connection_refused_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"^http://127\.0\.0\.1:{port}/LaMP_7/dev/dev_questions\.json: "
                                           r"cannot connect: .*refused"):
        download("LaMP_7", "dev", tmp_path / "d", base_url=f"http://127.0.0.1:{port}", timeout=5)
    assert not (tmp_path / "d").exists()


def test_timeout_is_configurable_and_reported(server, tmp_path):
    base, _ = server
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"dev_questions\.json: timed out after 0\.3 s"):
        download("LaMP_7", "dev", tmp_path / "d", base_url=base + "/slow", timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert not (tmp_path / "d").exists()


def test_existing_good_files_survive_a_failing_download(server, tmp_path):
    base, served = server
    questions, outputs = _tweet_split()
    _serve(served, "LaMP_7", "dev", questions, outputs)
    dest = tmp_path / "dest"
    download("LaMP_7", "dev", dest, base_url=base)
    before = {name: (dest / name).read_bytes() for name in _listing(dest)}
    # The site now serves a good questions file but a broken outputs file.
    questions[0]["input"] = TWEET.instruction("a different tweet")
    _serve(served, "LaMP_7", "dev", questions, '{"task": "LaMP_7", "golds": 5}')
    with pytest.raises(DownloadError, match=r"\"golds\" must be a list"):
        download("LaMP_7", "dev", dest, base_url=base)
    assert {name: (dest / name).read_bytes() for name in _listing(dest)} == before
    assert load_split(dest).users[0].input == _tweet_split()[0][0]["input"]


def test_cli_download_reports_written_files_and_one_line_errors(server, tmp_path, capsys):
    from fedhydra.cli.main import main

    base, served = server
    questions, outputs = _tweet_split()
    _serve(served, "LaMP_7", "dev", questions, outputs)
    args = ["data", "download", "--task", "LaMP_7", "--split", "dev", "--base-url", base]
    assert main(args + ["--dest", str(tmp_path / "ok")]) == 0
    assert f"wrote {tmp_path / 'ok' / 'dev_questions.json'}" in capsys.readouterr().out
    assert main(args[:4] + ["--split", "train", "--base-url", base, "--dest", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fedhydra: error: {base}/LaMP_7/train/train_questions.json: HTTP 404 File not found"
