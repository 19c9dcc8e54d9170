"""Generate the Python code of the service's .proto files with grpcio-tools (pinned in pyproject.toml).

    python -m fedhydra.proto.generate          # rewrite proto/*_pb2*.py from proto/*.proto
    python -m fedhydra.proto.generate --check  # exit 1 when the checked-in code is stale

grpc_tools writes imports after the .proto's path below the include root: a file compiled as
`personalizer_v1.proto` gives `import personalizer_v1_pb2`, which only works with proto/ on
sys.path. So each .proto is copied to `<tmp>/fedhydra/proto/` and compiled with `-I <tmp>`: the
generated service module then imports `from fedhydra.proto import personalizer_v1_pb2`, and the
descriptor is registered as `fedhydra/proto/personalizer_v1.proto`, unique in the process-wide
protobuf pool. No post-processing: the files are protoc's output as is, and the sync test
(tests/test_service_proto.py) compares them byte for byte with a fresh run of this function.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_PATH = Path("fedhydra") / "proto"  # the import path the generated code must use
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(folder: Path = PROTO_DIR) -> list[Path]:
    return sorted(folder.glob("*.proto"))


def generate(folder: Path = PROTO_DIR) -> dict[str, bytes]:
    """protoc's output for every .proto in `folder`: {file name: contents}; writes nothing in `folder`."""
    from grpc_tools import protoc

    try:
        from importlib.resources import files
        well_known = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto, should a file import one
    except (ImportError, TypeError):
        well_known = None
    sources = proto_files(folder)
    if not sources:
        raise FileNotFoundError(f"no .proto files in {folder}")
    with tempfile.TemporaryDirectory(prefix="fedhydra-protoc-") as tmp:
        root, out = Path(tmp) / "src", Path(tmp) / "out"
        (root / PACKAGE_PATH).mkdir(parents=True)
        out.mkdir()
        for src in sources:
            shutil.copyfile(src, root / PACKAGE_PATH / src.name)
        args = ["grpc_tools.protoc", f"-I{root}"] + ([f"-I{well_known}"] if well_known else [])
        args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        # Absolute paths inside the -I root: protoc maps each to its path below the root.
        args += [str(root / PACKAGE_PATH / src.name) for src in sources]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"grpc_tools.protoc failed (exit {code}) on {[s.name for s in sources]}")
        generated = out / PACKAGE_PATH
        result = {p.name: p.read_bytes() for p in sorted(generated.iterdir()) if p.name.endswith(SUFFIXES)}
    expected = {s.stem + suffix for s in sources for suffix in SUFFIXES}
    if set(result) != expected:
        raise RuntimeError(f"protoc wrote {sorted(result)}, expected {sorted(expected)}")
    return result


def stale_files(folder: Path = PROTO_DIR) -> list[str]:
    """Names of generated files that are missing or differ from a fresh generation."""
    fresh = generate(folder)
    return [name for name, data in fresh.items()
            if not (folder / name).is_file() or (folder / name).read_bytes() != data]


def write(folder: Path = PROTO_DIR) -> list[Path]:
    from fedhydra.common.files import write_atomic

    written = []
    for name, data in generate(folder).items():
        write_atomic(folder / name, data.decode("utf-8"))
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report generated files that are out of date")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"out of date: proto/{name} (run python -m fedhydra.proto.generate)")
        return 1 if stale else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
