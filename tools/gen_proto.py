#!/usr/bin/env python3
"""Regenerate the gRPC Python modules from the .proto files in proto/.

    python tools/gen_proto.py          # write src/dts_util/grpc/proto/*_pb2*.py
    python tools/gen_proto.py --check  # exit 1 if the committed modules drifted

The generated modules are committed (the import path
``dts_util.grpc.proto.image_generation_pb2`` must work after a plain
``pip install``); tests/grpc/test_proto_drift.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
OUT_DIR = REPO / "src" / "dts_util" / "grpc" / "proto"
# The seed protocol (drawthings.ImageGenerationService) and the Draw Things app's own protocol.
PROTO_NAMES = ("image_generation.proto", "draw_things_app.proto")
STEMS = tuple(name.removesuffix(".proto") for name in PROTO_NAMES)
GENERATED = tuple(f"{stem}{suffix}" for stem in STEMS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) into ``out_dir`` and make the imports package-relative."""
    from grpc_tools import protoc  # dev dependency: only this tool needs it

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_NAMES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    # protoc writes `import image_generation_pb2`, which only works with the
    # folder on sys.path; inside a package the import has to be relative.
    for stem in STEMS:
        grpc_module = out_dir / f"{stem}_pb2_grpc.py"
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", grpc_module.read_text(), flags=re.M)
        grpc_module.write_text(text)


def drifted() -> list[str]:
    """Names of generated modules whose committed text differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [name for name in GENERATED
                if not (OUT_DIR / name).exists()
                or (OUT_DIR / name).read_text() != (Path(tmp) / name).read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report drift; write nothing")
    if parser.parse_args().check:
        stale = drifted()
        if stale:
            print(f"generated modules are out of date: {', '.join(stale)}; run python tools/gen_proto.py")
            return 1
        print("generated modules match proto/")
        return 0
    generate(OUT_DIR)
    print(f"wrote {', '.join(GENERATED)} to {OUT_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
