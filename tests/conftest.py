"""Shared fixtures: a small real movie (generated, deterministic) and sweep files pointing at it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import write_spec


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The SLURM tests share one test cluster (and some change its settings): one worker runs them
    all, in turn. The longest chains go first, so the two workers end close together."""
    for item in items:
        if item.get_closest_marker("slurm") or item.get_closest_marker("switches_cluster_mode"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: "test_kill_anywhere" not in item.nodeid)


@pytest.fixture(autouse=True)
def one_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """A second guard besides the xdist group: two SLURM tests never use the cluster at once."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    from filelock import FileLock

    with FileLock(Path(tempfile.gettempdir()) / "gridsearch-slurm-tests.lock"):
        yield


@pytest.fixture(scope="session")
def movie(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gridsearch.synth import generate_movie

    return generate_movie(tmp_path_factory.mktemp("movie"))


@pytest.fixture(scope="session")
def sqlite_reference(tmp_path_factory: pytest.TempPathFactory, movie: dict[str, Path]):  # type: ignore[no-untyped-def]
    """The example grid on the embedded default, run once without interruption: the reference."""
    from gridsearch import results
    from gridsearch.engine import existing_ledger, run_sweep
    from gridsearch.spec import load
    from gridsearch.stages import Stage

    d = tmp_path_factory.mktemp("ref")
    spec = write_spec(d, movie, name="ref")
    out = run_sweep(load(spec))
    assert (out.completed, out.failed) == (12, 0)
    assert out.stage_runs == {Stage.SEGMENT: 2, Stage.LINK: 4, Stage.SOLVE: 12}
    with existing_ledger(load(spec)) as led:
        df = results.table(load(spec), led)
    return spec, df


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temp dir the `postgres` OS user can traverse (pytest's own are 0700 under root)."""
    d = Path(tempfile.mkdtemp(prefix="gs-test-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lab(open_tmp: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A server someone else runs (here: started by the test), a database of the user's on it:
    yields (server, credentials); database "lab"."""
    from gridsearch.postgres import ManagedServer

    monkeypatch.setenv("ULTRACK_DB_PW", "lab-password")
    server = ManagedServer(open_tmp / "lab" / "postgres")
    server.start()
    creds = server.credentials()
    server.create_database("lab")
    yield server, creds
    server.stop()


@pytest.fixture
def small_disk() -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size: a real full disk for the tests that need one."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mnt = Path(tempfile.mkdtemp(prefix="gs-full-", dir="/tmp"))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            mnt.rmdir()
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.rmdir()
