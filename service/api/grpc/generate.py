"""Write the Python modules of grpc_predict_v2.proto (``make grpc-stubs``; needs grpcio-tools,
which the service does not): protoc's messages (with their ``.pyi`` types) and gRPC's stubs.

One change to protoc's output: the messages are built into a descriptor pool of their own,
not protobuf's default one. Their names (``inference.ModelInferRequest`` ...) are Triton's,
and tritonclient registers the same names in the default pool: a process holding both (a
client beside the server, the tests) would fail with "duplicate symbol".
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
ROOT = PROTO.parents[3]  # the folder holding service/: imports are service.api.grpc...
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
_DEFAULT_POOL = "_descriptor_pool.Default()"
_OWN_POOL = "_descriptor_pool.DescriptorPool()"


def generate(out: Path) -> dict[str, str]:
    """The generated files' names and texts, written under ``out`` too (same layout)."""
    from grpc_tools import protoc

    proto = PROTO.relative_to(ROOT).as_posix()
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*args, f"--grpc_python_out={out}", proto]) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    folder = out / PROTO.parent.relative_to(ROOT)
    texts = {name: (folder / name).read_text() for name in GENERATED}
    pb2 = texts["grpc_predict_v2_pb2.py"]
    assert pb2.count(_DEFAULT_POOL) == 1, "protoc's output changed: look at the pool again"
    texts["grpc_predict_v2_pb2.py"] = pb2.replace(_DEFAULT_POOL, _OWN_POOL)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return texts


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (PROTO.parent / name).write_text(text)
            print(f"wrote {PROTO.parent / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
