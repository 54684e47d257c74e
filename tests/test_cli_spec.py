"""The CLI's cached description of the registry matches the registry."""

from __future__ import annotations

from den.cli import spec


def test_cached_spec_is_the_registry() -> None:
    live = spec.from_registry()
    assert live, "no method has a CLI path"
    loaded = spec.load()  # from the cache, or built and cached now
    assert [m.name for m in loaded] == [m.name for m in live]
    for a, b in zip(loaded, live, strict=True):
        assert a.fields == b.fields, a.name
        assert a.doc == b.doc and a.right == b.right
        assert a.cli is not None and b.cli is not None
        assert a.cli.path == b.cli.path and tuple(a.cli.columns) == tuple(b.cli.columns)
    again = spec._load(spec._dump(live))
    assert [m.fields for m in again] == [m.fields for m in live]


def test_a_source_change_changes_the_fingerprint(tmp_path: object) -> None:
    before = spec._fingerprint()
    target = spec.PACKAGE / "cli" / "spec.py"
    st = target.stat()
    import os

    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        assert spec._fingerprint() != before
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert spec._fingerprint() == before
