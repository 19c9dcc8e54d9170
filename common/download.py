"""Downloading a LaMP split from LaMP's official site, all or nothing.

LaMP serves `<base>/<folder>/<split>/<split>_questions.json` and `..._outputs.json`
(the test split: questions only), and the time-based split under `<base>/time/<folder>/...`.
The folder is `LaMP_<n>`, except for LaMP-2: the site's current LaMP-2 (movie tagging,
our LaMP_2M) lives in `LaMP_2/new`, and the first LaMP-2 (news categorization, our LaMP_2N)
in `LaMP_2`. These paths come from download scripts that use the site (e.g.
linfeng-du/PURPLE `scripts/download.sh`); the time-based LaMP_2M path (`time/LaMP_2/new`) has
fewer such witnesses. Every download is validated with `load_split` for the task asked for,
so a path that serves another task's data fails loudly instead of being saved.

Files are streamed into a hidden temporary folder inside `dest`, validated as a pair and only
then renamed into place; any failure leaves `dest` as it was.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .data import OUTPUTS_SUFFIX, QUESTIONS_SUFFIX, load_split
from .records import DataError

DEFAULT_BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP"
SPLITS = ("train", "dev", "test")
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 16

# Our task names -> LaMP's folder on the download site.
LAMP_FOLDERS: dict[str, str] = {
    "LaMP_1": "LaMP_1",
    "LaMP_2N": "LaMP_2",
    "LaMP_2M": "LaMP_2/new",
    "LaMP_3": "LaMP_3",
    "LaMP_4": "LaMP_4",
    "LaMP_5": "LaMP_5",
    "LaMP_7": "LaMP_7",
}


class DownloadError(ValueError):
    """A download failed; the message names the URL and the problem. Nothing was written."""


def split_urls(task: str, split: str, base_url: str = DEFAULT_BASE_URL,
               time_based: bool = False) -> list[tuple[str, str]]:
    """(URL, file name) of each file of one LaMP split: questions, then outputs unless `split` is test."""
    if task not in LAMP_FOLDERS:
        known = ", ".join(sorted(LAMP_FOLDERS))
        raise ValueError(f"no LaMP download for task {task!r}; downloadable tasks: {known}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; LaMP splits: {', '.join(SPLITS)}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {base_url!r}")
    folder = ("time/" if time_based else "") + LAMP_FOLDERS[task]
    names = [split + QUESTIONS_SUFFIX] + ([] if split == "test" else [split + OUTPUTS_SUFFIX])
    return [(f"{base_url.rstrip('/')}/{folder}/{split}/{name}", name) for name in names]


def _fetch(url: str, target: Path, timeout: float) -> None:
    """Stream `url` into `target` with a progress bar; any failure is a DownloadError naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "fedhydra-download"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
            length_header = response.headers.get("Content-Length")
            expected = int(length_header) if length_header and length_header.isdigit() else None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise DownloadError(f"{url}: truncated download: got {received} of {expected} bytes")
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise DownloadError(f"{url}: timed out after {timeout:g} s") from None
        raise DownloadError(f"{url}: cannot connect: {reason}") from None
    except http.client.IncompleteRead as exc:
        got = len(exc.partial)
        raise DownloadError(f"{url}: truncated download: connection closed after {got} more bytes") from None
    except (socket.timeout, TimeoutError):
        raise DownloadError(f"{url}: timed out after {timeout:g} s") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise DownloadError(f"{url}: connection failed: {exc!r}") from None
    except OSError as exc:
        raise DownloadError(f"{url}: cannot write {target}: {exc.strerror or exc}") from None
    if received == 0:
        raise DownloadError(f"{url}: the server sent an empty file")


def download(task: str, split: str, dest: str | Path, base_url: str = DEFAULT_BASE_URL,
             time_based: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> list[Path]:
    """Download one LaMP split of `task` into `dest`; returns the paths written.

    The files are validated with `load_split` (as `task`; the test split has questions only)
    before they replace anything in `dest`. On any error (HTTP status, connection, timeout,
    truncated or malformed content) a DownloadError names the URL and the problem, and
    `dest` holds nothing new: no partial, temporary or half-validated file.
    """
    files = split_urls(task, split, base_url=base_url, time_based=time_based)
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: exists and is not a folder")
    # The outermost folder this call creates, removed again if the download fails.
    created = next((p for p in reversed([dest, *dest.parents]) if not p.exists()), None)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lamp-download-", dir=dest))
    except OSError as exc:
        raise DownloadError(f"{dest}: cannot create a folder there: {exc.strerror or exc}") from None
    try:
        for url, name in files:
            _fetch(url, staging / name, timeout)
        try:
            load_split(staging / files[0][1], task=task, require_golds=split != "test")
        except DataError as exc:
            # Name the URL, not the staging file that is about to disappear.
            message = str(exc)
            for url, name in files:
                message = message.replace(str(staging / name), url)
            raise DownloadError(f"downloaded data is not valid {task}: {message}") from None
        written = []
        for _, name in files:
            os.replace(staging / name, dest / name)
            written.append(dest / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not any(dest.iterdir()):
            for folder in (dest, *dest.parents):  # empty folders made by this call, innermost first
                folder.rmdir()
                if folder == created:
                    break
