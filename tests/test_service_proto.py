"""The checked-in generated code is exactly what grpcio-tools makes from proto/personalizer_v1.proto."""

from __future__ import annotations

import shutil

from fedhydra.proto import generate


def test_generated_code_is_in_sync_with_the_proto():
    fresh = generate.generate()
    assert sorted(fresh) == ["personalizer_v1_pb2.py", "personalizer_v1_pb2.pyi", "personalizer_v1_pb2_grpc.py"]
    stale = [name for name, data in fresh.items() if (generate.PROTO_DIR / name).read_bytes() != data]
    assert not stale, f"out of date: {stale}; run `python -m fedhydra.proto.generate`"


def test_a_changed_proto_is_detected(tmp_path):
    for p in generate.PROTO_DIR.iterdir():
        if p.suffix in (".proto", ".py", ".pyi") and p.name.startswith("personalizer_v1"):
            shutil.copyfile(p, tmp_path / p.name)
    assert generate.stale_files(tmp_path) == []
    proto = tmp_path / "personalizer_v1.proto"
    proto.write_text(proto.read_text().replace("message StatusRequest {}", "message StatusRequest { bool verbose = 1; }"))
    assert set(generate.stale_files(tmp_path)) == {"personalizer_v1_pb2.py", "personalizer_v1_pb2.pyi"}


def test_generated_code_imports_as_part_of_the_fedhydra_package():
    from fedhydra.proto import personalizer_v1_pb2 as pb
    from fedhydra.proto import personalizer_v1_pb2_grpc as pb_grpc

    assert pb.DESCRIPTOR.package == "fedhydra.v1"
    assert pb.DESCRIPTOR.name == "fedhydra/proto/personalizer_v1.proto"  # unique in the global descriptor pool
    service = pb.DESCRIPTOR.services_by_name["Personalizer"]
    assert [m.name for m in service.methods] == ["Personalize", "AddHistory", "Status"]
    assert pb_grpc.personalizer__v1__pb2 is pb if hasattr(pb_grpc, "personalizer__v1__pb2") else \
        pb_grpc.fedhydra_dot_proto_dot_personalizer__v1__pb2 is pb
