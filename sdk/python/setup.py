"""Build hook: generate the gRPC code of `maos.v1` from the repository's `client/proto`.

`pip install ./sdk/python` builds in the source tree, so `../../client/proto` is reachable; the
generated modules go into the build directory only (`maos/v1/*_pb2.py`, `*_pb2_grpc.py`), never
into the source tree or git. `MAOS_PROTO_DIR` points elsewhere (a checkout of `client/proto`).
"""

from __future__ import annotations

import os
import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


def proto_root() -> pathlib.Path:
    root = pathlib.Path(os.environ.get("MAOS_PROTO_DIR", HERE / ".." / ".." / "client" / "proto")).resolve()
    if not (root / "maos" / "v1").is_dir():
        sys.exit(
            f"maos: the protobuf sources are not at {root}/maos/v1. Build the package from a MAOS "
            "checkout (`pip install ./sdk/python` from the repository root, which builds in place), "
            "or set MAOS_PROTO_DIR to a directory holding maos/v1/*.proto."
        )
    return root


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # the build requirement grpcio-tools (pyproject.toml)
    import grpc_tools

    root = proto_root()
    protos = sorted(str(p) for p in (root / "maos" / "v1").glob("*.proto"))
    if not protos:
        sys.exit(f"maos: no .proto files in {root}/maos/v1")
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"maos: grpc_tools.protoc failed on {root}/maos/v1 (command: {' '.join(args)})")


class BuildWithProtos(build_py):
    def run(self) -> None:
        super().run()
        generate(pathlib.Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithProtos})
