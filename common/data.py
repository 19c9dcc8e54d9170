"""Reading and validating LaMP's own files.

A LaMP split is a pair of files in one folder: `<split>_questions.json` (a list of
`{id, input, profile: [{id, <task fields>}...]}`, one item per user in the user-based
split) and `<split>_outputs.json` (`{"task": "LaMP_<n>", "golds": [{id, output}...]}`).
The time-based split uses the same format. LaMP's test split ships without outputs.

Every check raises `DataError` with one line naming the file, the item and the problem:
`"<file>: item <index> (id <id>): <problem>"`. Loading never writes anything.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

from .records import DataError, LampSplit, User
from .tasks import PROFILE_FIELDS, TASKS, Task, get_task

QUESTIONS_SUFFIX = "_questions.json"
OUTPUTS_SUFFIX = "_outputs.json"

# LaMP's outputs files name the task as LaMP does; the current "LaMP_2" is movie tagging.
# Our own names are accepted too, so files we write ourselves read back unchanged.
_LAMP_TASK_NAMES: dict[str, tuple[str, ...]] = {
    "LaMP_1": ("LaMP_1",),
    "LaMP_2": ("LaMP_2M", "LaMP_2N"),  # first is the default reading
    "LaMP_3": ("LaMP_3",),
    "LaMP_4": ("LaMP_4",),
    "LaMP_5": ("LaMP_5",),
    "LaMP_7": ("LaMP_7",),
} | {name: (name,) for name in TASKS}


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}".rstrip()


def _read_json(path: Path) -> Any:
    """Parse one JSON file; a missing, unreadable or malformed file is a one-line DataError."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def resolve_files(path: str | Path) -> tuple[Path, Path, str]:
    """(questions file, outputs file, split name) for a folder or a questions/outputs file path."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{QUESTIONS_SUFFIX}"))
        if not found:
            raise DataError(f"{path}: no *{QUESTIONS_SUFFIX} file in this folder")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several question files ({names}); give the path of one")
        questions = found[0]
    elif path.name.endswith(OUTPUTS_SUFFIX):
        questions = path.with_name(path.name[: -len(OUTPUTS_SUFFIX)] + QUESTIONS_SUFFIX)
    elif not path.exists():
        raise DataError(f"{path}: file not found")
    elif path.name.endswith(QUESTIONS_SUFFIX):
        questions = path
    else:
        raise DataError(f"{path}: expected a folder or a file named <split>{QUESTIONS_SUFFIX}")
    if not questions.name.endswith(QUESTIONS_SUFFIX):
        raise DataError(f"{questions}: expected a file named <split>{QUESTIONS_SUFFIX}")
    split = questions.name[: -len(QUESTIONS_SUFFIX)]
    return questions, questions.with_name(split + OUTPUTS_SUFFIX), split


def _task_from(outputs_task: Any, requested: str | None, outputs_path: Path,
               has_outputs: bool) -> tuple[Task, str | None]:
    """The task to read with, from `requested` (--task) and the outputs file's "task" field."""
    if requested is not None and requested not in TASKS:
        raise DataError(f"unknown task {requested!r}; known tasks: {', '.join(TASKS)}")
    if outputs_task is None:
        if requested is None:
            where = (f"{outputs_path}: no \"task\" field" if has_outputs
                     else f"{outputs_path.with_name(outputs_path.name.replace(OUTPUTS_SUFFIX, QUESTIONS_SUFFIX))}: "
                          f"no outputs file ({outputs_path.name})")
            raise DataError(f"{where} to read the task from; give the task (--task)")
        return get_task(requested), None
    if not isinstance(outputs_task, str):
        raise DataError(f"{outputs_path}: \"task\" must be a string, got {_describe(outputs_task)}")
    readings = _LAMP_TASK_NAMES.get(outputs_task)
    if readings is None:
        raise DataError(f"{outputs_path}: unknown task {outputs_task!r}; known tasks: {', '.join(_LAMP_TASK_NAMES)}")
    if requested is None:
        return get_task(readings[0]), outputs_task
    if requested not in readings:
        raise DataError(f"{outputs_path}: file is for task {outputs_task!r} but task {requested!r} was asked for")
    return get_task(requested), outputs_task


def _check_field(task: Task, field: str, value: Any) -> str | None:
    """Why a profile field's value is wrong for `task`, or None when it is fine."""
    if task.name == "LaMP_3" and field == "score":
        # LaMP-3 writes scores as digit strings; integers are accepted as well.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return f"\"score\" must be a digit string or an integer, got {_describe(value)}"
        if str(value).strip() not in task.labels:
            return f"\"score\" must be one of {', '.join(task.labels)}, got {_describe(value)}"
        return None
    if not isinstance(value, str):
        return f"{json.dumps(field)} must be a string, got {_describe(value)}"
    return None


def _validate_question(task: Task, path: Path, index: int, item: Any) -> User:
    where = f"{path}: item {index}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {_describe(item)}")
    if "id" not in item:
        raise DataError(f"{where}: missing \"id\"")
    qid = item["id"]
    if not isinstance(qid, str):
        raise DataError(f"{where}: \"id\" must be a string, got {_describe(qid)}")
    where = f"{where} (id {qid})"
    for key in ("input", "profile"):
        if key not in item:
            raise DataError(f"{where}: missing {json.dumps(key)}")
    text = item["input"]
    if not isinstance(text, str):
        raise DataError(f"{where}: \"input\" must be a string, got {_describe(text)}")
    if not text.strip():
        raise DataError(f"{where}: \"input\" is empty")
    try:
        content = task.content(text)
    except ValueError:
        raise DataError(f"{where}: \"input\" does not contain {task.name}'s marker {task.marker!r}") from None
    if not content:
        raise DataError(f"{where}: \"input\" has no content after {task.marker!r}")
    profile = item["profile"]
    if not isinstance(profile, list):
        raise DataError(f"{where}: \"profile\" must be a list, got {_describe(profile)}")
    if not profile:
        raise DataError(f"{where}: \"profile\" is empty")
    seen: dict[str, int] = {}
    for j, entry in enumerate(profile):
        at = f"{where}: profile item {j}"
        if not isinstance(entry, dict):
            raise DataError(f"{at}: expected an object, got {_describe(entry)}")
        if "id" not in entry:
            raise DataError(f"{at}: missing \"id\"")
        pid = entry["id"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{at}: \"id\" must be a string, got {_describe(pid)}")
        at = f"{at} (id {pid})"
        if str(pid) in seen:
            raise DataError(f"{at}: duplicate profile id (first at profile item {seen[str(pid)]})")
        seen[str(pid)] = j
        for field in PROFILE_FIELDS[task.name]:
            if field not in entry:
                raise DataError(f"{at}: missing {json.dumps(field)} ({task.name} profile items need "
                                f"{', '.join(PROFILE_FIELDS[task.name])})")
            problem = _check_field(task, field, entry[field])
            if problem:
                raise DataError(f"{at}: {problem}")
    return User(id=qid, input=text, profile=profile)


def _read_golds(task: Task, path: Path, data: Any) -> dict[str, str]:
    """Gold outputs by question id, from a parsed outputs file."""
    golds = data["golds"]
    by_id: dict[str, str] = {}
    first: dict[str, int] = {}
    for j, gold in enumerate(golds):
        where = f"{path}: gold {j}"
        if not isinstance(gold, dict):
            raise DataError(f"{where}: expected an object, got {_describe(gold)}")
        for key in ("id", "output"):
            if key not in gold:
                raise DataError(f"{where}: missing {json.dumps(key)}")
        gid, output = gold["id"], gold["output"]
        if not isinstance(gid, str):
            raise DataError(f"{where}: \"id\" must be a string, got {_describe(gid)}")
        where = f"{where} (id {gid})"
        rating_int = task.kind == "rating" and isinstance(output, int) and not isinstance(output, bool)
        if not isinstance(output, str) and not rating_int:
            raise DataError(f"{where}: \"output\" must be a string, got {_describe(output)}")
        if gid in first:
            raise DataError(f"{where}: duplicate gold id (first at gold {first[gid]})")
        first[gid] = j
        by_id[gid] = str(output)
    return by_id


def _outputs_header(path: Path, data: Any) -> Any:
    """Check an outputs file's shape; return its "task" field (None when absent)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with \"golds\", got {_describe(data)}")
    if "golds" not in data:
        raise DataError(f"{path}: missing \"golds\"")
    if not isinstance(data["golds"], list):
        raise DataError(f"{path}: \"golds\" must be a list, got {_describe(data['golds'])}")
    return data.get("task")


def load_split(path: str | Path, task: str | None = None, require_golds: bool = True) -> LampSplit:
    """Read and validate one LaMP split.

    `path` is a folder holding one `<split>_questions.json` (and its `<split>_outputs.json`),
    or the path of a questions file. The task comes from `task` or from the outputs file
    ("LaMP_2" reads as LaMP_2M unless `task` is "LaMP_2N"); both must agree when both are given.
    With `require_golds=False` the outputs file may be absent (LaMP's test split) and every
    user gets `gold=None`; an outputs file that is present must hold a gold for every question.
    Raises DataError naming file, item and problem.
    """
    questions_path, outputs_path, split = resolve_files(path)
    questions = _read_json(questions_path)  # before the outputs: a missing questions file is the first problem
    outputs = None
    if outputs_path.exists() or require_golds:
        outputs = _read_json(outputs_path)
    outputs_task = _outputs_header(outputs_path, outputs) if outputs is not None else None
    the_task, lamp_name = _task_from(outputs_task, task, outputs_path, outputs is not None)

    if not isinstance(questions, list):
        raise DataError(f"{questions_path}: expected a list of questions, got {_describe(questions)}")
    if not questions:
        raise DataError(f"{questions_path}: no questions in the file")
    users: list[User] = []
    first: dict[str, int] = {}
    for i, item in enumerate(questions):
        try:
            user = _validate_question(the_task, questions_path, i, item)
        except DataError as exc:
            if lamp_name == "LaMP_2" and task is None:
                # LaMP's "LaMP_2" is movie tagging now; the first LaMP-2 (news) used the same name.
                raise DataError(f"{exc} (read as LaMP_2M; for news categorization give --task LaMP_2N)") from None
            raise
        if user.id in first:
            raise DataError(f"{questions_path}: item {i} (id {user.id}): duplicate question id "
                            f"(first at item {first[user.id]})")
        first[user.id] = i
        users.append(user)

    if outputs is not None:
        golds = _read_golds(the_task, outputs_path, outputs)
        for j, gid in enumerate(golds):
            if gid not in first:
                raise DataError(f"{outputs_path}: gold {j} (id {gid}): no question with this id in "
                                f"{questions_path.name}")
        for i, user in enumerate(users):
            user.gold = golds.get(user.id)
            if user.gold is None:
                raise DataError(f"{questions_path}: item {i} (id {user.id}): no gold in {outputs_path.name}")
    meta = {"split": split, "questions": str(questions_path),
            "outputs": str(outputs_path) if outputs is not None else None, "lamp_task": lamp_name}
    return LampSplit(task=the_task, users=users, source=questions_path, meta=meta)


def summarize(data: LampSplit) -> str:
    """One line: task, split, users, profile sizes and golds present."""
    sizes = [len(u.profile) for u in data.users]
    with_gold = sum(u.gold is not None for u in data.users)
    return (f"{data.task.name} ({data.task.title}) split {data.meta.get('split', '?')}: "
            f"{len(data.users)} users, profile size min {min(sizes)} / median {statistics.median(sizes):g} / "
            f"max {max(sizes)}, golds {with_gold}/{len(data.users)} ({data.source})")


def validate_path(path: str | Path, task: str | None = None) -> str:
    """Load and validate the split at `path` (outputs file optional, as in LaMP's test split); a one-line summary."""
    return summarize(load_split(path, task=task, require_golds=False))


def split_users(users: list[User], n_train: int, n_test: int, seed: int) -> tuple[list[User], list[User]]:
    """Disjoint random training and test users, the same for the same seed and input order."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"user counts must not be negative (train {n_train}, test {n_test})")
    ids = [u.id for u in users]
    if len(set(ids)) != len(ids):
        raise ValueError("users have duplicate ids; cannot split them into disjoint sets")
    if n_train + n_test > len(users):
        raise ValueError(f"asked for {n_train} training + {n_test} test users but only {len(users)} users exist")
    order = random.Random(seed).sample(range(len(users)), n_train + n_test)
    return [users[i] for i in order[:n_train]], [users[i] for i in order[n_train:]]


def more_users(users: list[User], taken: list[User], n: int, seed: int) -> list[User]:
    """`n` random users of `users` outside `taken` (seeded apart from split_users, so asking for more users here never
    changes which users the split chose)."""
    if n < 0:
        raise ValueError(f"user count must not be negative ({n})")
    ids = {u.id for u in taken}
    rest = [u for u in users if u.id not in ids]
    if n > len(rest):
        raise ValueError(f"asked for {n} more users but only {len(rest)} are not already train or test users")
    return random.Random(f"{seed}:more").sample(rest, n)


DATA_NOTES = ("SOURCES.md", "README.md")  # files that may describe a data folder, read for its name


def dataset_name(path: str | Path | None, task: Task, given: str = "") -> str:
    """The data set's name for results: `given` (the data-name setting) as written; else, when a SOURCES.md or
    README.md beside the split (or one folder up) opens with a heading "<name> as ..." (e.g. "Amazon reviews as
    two LaMP-format tasks"), "<name>, LaMP-3 format": data in a LaMP task's format is never reported as that LaMP
    task. Otherwise (LaMP's own files, synthetic users): the task's name and title."""
    if given.strip():
        return given.strip()
    if path:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        for where in (folder, folder.parent):
            for note in DATA_NOTES:
                heading = _heading(where / note)
                if heading and " as " in heading:
                    return f"{heading.split(' as ', 1)[0].strip()}, {task.name.replace('_', '-')} format"
    return f"{task.name} ({task.title})"


def _heading(path: Path) -> str | None:
    """The first Markdown heading of a file ('# ...'), or None when it is absent or unreadable."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.startswith("# "):
                    return line[2:].strip()
                if line.strip():
                    return None
    except OSError:
        return None
    return None
