"""The package installed from the repository, with its generated code, and nothing generated
in the source tree."""

from __future__ import annotations

import re
from pathlib import Path

import maos
from maos.v1 import agents_pb2, agents_pb2_grpc, cluster_pb2, kv_pb2, tasks_pb2, tasks_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
SOURCE = REPO / "sdk" / "python" / "src"


def test_the_package_is_installed_and_not_imported_from_the_source_tree() -> None:
    installed = Path(maos.__file__).resolve()
    assert "site-packages" in installed.parts, installed
    assert SOURCE not in installed.parents, installed
    assert (installed.parent / "py.typed").exists()


def test_generated_code_matches_the_repository_protos() -> None:
    # Every rpc and message in client/proto is in the generated descriptors: a stale install fails.
    for proto, module in [("tasks", tasks_pb2), ("agents", agents_pb2), ("kv", kv_pb2), ("cluster", cluster_pb2)]:
        text = (REPO / "client" / "proto" / "maos" / "v1" / f"{proto}.proto").read_text()
        descriptor = module.DESCRIPTOR
        assert descriptor.package == "maos.v1"
        rpcs = {m.name for s in descriptor.services_by_name.values() for m in s.methods}
        assert set(re.findall(r"^\s*rpc (\w+)\(", text, re.M)) == rpcs, proto
        for message in re.findall(r"^message (\w+) \{", text, re.M):
            assert message in descriptor.message_types_by_name, (proto, message)
    assert hasattr(tasks_pb2_grpc, "TaskServiceStub") and hasattr(agents_pb2_grpc, "WorkerServiceStub")
    assert not list((SOURCE / "maos" / "v1").glob("*_pb2*.py")), "generated code must not be in the source tree"
