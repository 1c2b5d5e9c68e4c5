"""Shared fixtures: every module in tests/fixtures/ is a pytest plugin (real Redis, gRPC, vLLM)."""

from pathlib import Path

pytest_plugins = [
    f"tests.fixtures.{p.stem}"
    for p in sorted((Path(__file__).parent / "fixtures").glob("*.py"))
    if not p.name.startswith("_")
]
