"""Python client stubs generated from the shipped .proto files (needs grpcio-tools).

The stubs are plain top-level modules (``inference_pb2``, ``inference_pb2_grpc``,
``management_pb2``, ``management_pb2_grpc``), exactly what TorchServe's clients import.
Example::

    flambeau grpc-stubs ./client        # or: generate_stubs(Path("client"))
    stubs = load_stubs(Path("client"))  # generate and import: stubs.inference_pb2, ...
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

PROTOS = ("inference.proto", "management.proto")


def proto_dir() -> Path:
    """Where the .proto files of this plugin live (inside the installed package)."""
    return Path(__file__).resolve().parent / "protos"


def _include_dirs() -> list[str]:
    import grpc_tools

    includes = [str(Path(grpc_tools.__file__).resolve().parent / "_proto")]
    # google/rpc/status.proto comes with googleapis-common-protos, next to its modules.
    spec = importlib.util.find_spec("google.rpc.status_pb2")
    if spec is not None and spec.origin:
        includes.append(str(Path(spec.origin).resolve().parents[2]))
    return includes


def generate_stubs(out_dir: Path) -> list[Path]:
    """Write the client modules into ``out_dir``; returns their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    source = proto_dir()
    args = ["grpc_tools.protoc", f"-I{source}"]
    args += [f"-I{include}" for include in _include_dirs()]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(source / name) for name in PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed for {', '.join(PROTOS)}")
    return sorted(out_dir.glob("*_pb2*.py*"))


def load_stubs(out_dir: Path) -> SimpleNamespace:
    """Generate the stubs into ``out_dir`` and import them; a namespace of the four modules.

    The modules import each other by top-level name (as protoc writes them), so ``out_dir`` is
    on ``sys.path`` only while they load, and they are left out of ``sys.modules`` afterwards
    so that another directory's stubs of the same names can be loaded later.
    """
    generate_stubs(out_dir)
    names = [path.stem for path in sorted(out_dir.glob("*_pb2*.py"))]
    sys.path.insert(0, str(out_dir))
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    try:
        modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(out_dir))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return SimpleNamespace(**modules)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flambeau grpc-stubs", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="directory to write the modules into")
    args = parser.parse_args(argv)
    try:
        written = generate_stubs(args.out_dir)
    except ImportError:
        print("flambeau grpc-stubs needs grpcio-tools: pip install grpcio-tools", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
