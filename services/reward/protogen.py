"""Generate the reward service's gRPC code from ``proto/reward.proto`` (``make proto``).

``python -m services.reward.protogen`` writes ``reward_pb2.py``, ``reward_pb2.pyi`` and
``reward_pb2_grpc.py`` into ``services/reward/rpc/``; ``--check`` generates into a temporary
directory and exits 1 when the checked-in files differ (``make proto-check``, part of
``make test``), so a proto edit without regenerating fails CI instead of drifting.

The proto is mapped to the virtual path ``services/reward/rpc/reward.proto`` so the generated
stubs import ``from services.reward.rpc import reward_pb2``, a real package import.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "reward.proto"
PACKAGE = Path("services/reward/rpc")
OUTPUTS = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc (the one bundled with grpcio-tools) with its output rooted at ``out_dir``."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE.as_posix()}={PROTO.parent}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(PROTO),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {PROTO}")


def stale_files(checked_in: Path) -> list[str]:
    """The generated files under ``checked_in`` that are missing or differ from a fresh run."""
    with tempfile.TemporaryDirectory(prefix="mapo-protogen-") as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        return [
            name
            for name in OUTPUTS
            if not (checked_in / name).is_file()
            or not filecmp.cmp(fresh / name, checked_in / name, shallow=False)
        ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.reward.protogen",
        description="Generate (or with --check, verify) the reward service's gRPC code.",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the checked-in code is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(REPO / PACKAGE)
        if stale:
            print(
                f"{PACKAGE}: {', '.join(stale)} out of date with {PROTO.relative_to(REPO)}; "
                "run `make proto` and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"{PACKAGE}: generated code matches {PROTO.relative_to(REPO)}")
        return 0
    generate(REPO)
    print(f"generated {', '.join(OUTPUTS)} in {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
