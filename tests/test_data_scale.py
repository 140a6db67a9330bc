"""Data at scale: prepare once into shards (resumable after a kill), stream them through grain
worker processes, train from a prepared directory, and memory that does not grow with the corpus."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import data
import data.corpus
from data.corpus import stdlib_files
from data.prepare import prepare
from data.shards import pack_documents, read_manifest, write_streams

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def linked_corpus(root: Path, copies: int, packages=("json/", "email/", "http/", "asyncio/")) -> Path:
    """A directory of `copies` x some stdlib packages, as symlinks (cheap to make at any size)."""
    files = [f for f in stdlib_files() if f.startswith(packages)]
    for c in range(copies):
        for f in files:
            dst = root / f"c{c:03d}" / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(STDLIB / f, dst)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [(STDLIB / f).read_text() for f in stdlib_files() if f.startswith("json/")]
    return data.train_tokenizer(docs, 512, tmp_path_factory.mktemp("tok") / "tokenizer.model", 10**6)


def prepare_cli(src, out, tok, *extra):
    return subprocess.Popen([sys.executable, "-m", "data.prepare", str(src), str(out), "--tokenizer", tok.path,
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shard_bytes(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tok"))}


def test_prepare_killed_half_way_finishes_only_the_missing_units(tmp_path, tok):
    src = linked_corpus(tmp_path / "src", 6)
    straight = tmp_path / "straight"
    assert prepare_cli(src, straight, tok, "--workers", "2").wait() == 0
    m = read_manifest(straight)
    units = len(list((straight / "units").iterdir()))
    assert units >= 6 and m["splits"]["train"]["documents"] > 10 * m["splits"]["val"]["documents"] > 0
    assert (straight / "tokenizer.model").read_bytes() == Path(tok.path).read_bytes()

    out = tmp_path / "killed"
    proc = prepare_cli(src, out, tok, "--workers", "1")
    while not (out / "units").is_dir() or len(list((out / "units").iterdir())) < 2:
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = len(list((out / "units").iterdir()))
    rerun = prepare_cli(src, out, tok, "--workers", "2")
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err
    assert f"{units - done} of {units} units to tokenize" in err
    assert "MB/s, ETA" in err
    # Same shards and manifest as the straight run, nothing left half-written.
    assert read_manifest(out) == m and shard_bytes(out) == shard_bytes(straight)


def test_prepare_errors_are_one_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    proc = prepare_cli(bad, tmp_path / "out", tok)
    _, err = proc.communicate()
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == \
        f"error: {bad} line 2 has no string field 'text' (data.jsonl_field)"
    (tmp_path / "t.txt").write_text("hello\n" * 100)
    assert prepare_cli(tmp_path / "t.txt", tmp_path / "p", tok).wait() == 0
    other = data.train_tokenizer(["hello world\n" * 50, "def f(): pass\n" * 50], 400, tmp_path / "o.model", 10**5)
    with pytest.raises(data.DataError, match="other settings or another tokenizer; prepare into a new directory"):
        prepare(str(tmp_path / "t.txt"), tmp_path / "p", other)


def test_grain_worker_processes_stream_the_same_batches(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(4, 500, rng.integers(1, 300))) for _ in range(40)] for _ in range(3)]
    shards = data.ShardSet(write_streams(tmp_path, {"train": [pack_documents(d, 1, 2) for d in docs]}), "train", 64)
    ld = data.Loader(shards, global_batch=8, shuffle=True, seed=3, process_index=1, process_count=2)
    for workers in (0, 2):  # 0: prefetch threads of this process, reading the same shards at once
        stream = ld.stream(5, workers=workers, prefetch=8)
        for step in range(5, 30):
            got, want = next(stream), ld.batch(step)
            assert all(np.array_equal(got[k], want[k]) for k in want), (workers, step)
        stream.close()


def test_training_reads_a_prepared_directory(tmp_path, tok):
    src = linked_corpus(tmp_path / "src", 1, ("json/",))
    out = tmp_path / "prepared"
    proc = prepare_cli(src, out, tok, "--val-fraction", "0.3")
    assert proc.wait() == 0, proc.stderr.read()
    from configs import load_config
    cfg = load_config("tiny", [f"data.path={out}", f"train.run_dir={tmp_path / 'run'}", "model.vocab_size=512",
                               "data.seq_len=32", "train.batch_size=4"])
    got = data.load_tokenizer(cfg, tmp_path / "run")
    assert got.path == str(out / "tokenizer.model")
    ld = data.make_loader(cfg, got, tmp_path / "run")
    assert data.prepared_dir(cfg, got, tmp_path / "run") == str(out) and not (tmp_path / "run").exists()
    assert got.decode(ld.batch(0)["inputs"][0]) in "".join((STDLIB / f).read_text() for f in stdlib_files()
                                                            if f.startswith("json/"))
    other = data.train_tokenizer(["hello world\n" * 50, "def f(): pass\n" * 50], 400, tmp_path / "o.model", 10**5)
    with pytest.raises(data.DataError, match=rf"data.path {out} was prepared with another tokenizer than"):
        data.make_loader(cfg, other, tmp_path / "run")


LOADER_UNDER_LIMIT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import data
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    shards = data.ShardSet(sys.argv[1], "train", 256)
    ld = data.Loader(shards, global_batch=64, shuffle=True, seed=0)
    ld.batch(0)
    headroom = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize:") + headroom,) * 2)
    try:
        np.ones(shards.num_tokens, np.int32)  # the corpus itself does not fit under the limit
        print("corpus fits")
    except MemoryError:
        pass
    n = 0
    for step in range(ld.num_batches):
        n += int(ld.batch(step)["loss_mask"].sum())
    print("rows", ld.num_rows, "targets", n)
""")


def test_loader_memory_does_not_grow_with_the_corpus(tmp_path):
    """Scaled down: every row of a 192 MB token corpus, read with 16 MB of address space to spare."""
    rng = np.random.default_rng(0)
    streams = []
    for _ in range(48):  # 48 shards of 1M tokens
        s = rng.integers(4, 30000, 1 << 20).astype(np.int32)
        s[rng.integers(0, len(s), 2000)] *= -1  # document starts
        streams.append(s)
    write_streams(tmp_path, {"train": streams})
    headroom = 16 << 20
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", LOADER_UNDER_LIMIT, str(tmp_path), str(headroom)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "corpus fits" not in out.stdout
    rows = int(out.stdout.split()[1])
    assert rows == 48 * 4096 and 48 << 22 == 12 * headroom  # the corpus is 12x the headroom


def _train_rusage(args, cgroup: Path | None = None):
    """Run train.py; (returncode, stderr, peak RSS in bytes) of that process alone."""
    def enter_cgroup():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TESSERA_"))}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=enter_cgroup)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_maxrss * 1024


def memory_cgroup(limit: int) -> Path | None:
    """A cgroup-v1 memory group capped at `limit` bytes (RSS; page cache is reclaimed), or None
    where this machine does not let us make one."""
    path = Path("/sys/fs/cgroup/memory") / f"tessera-test-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        return path
    except OSError:
        return None


def remove_cgroup(path: Path) -> None:
    """Move any process left in the group (a loader worker still exiting) out, then remove it."""
    for _ in range(100):
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                (path.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it exited meanwhile
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_corpus(tmp_path, tok):
    """A 1.2 GB token corpus is prepared, then trained on with RSS capped at what the same training needs on
    a 5 MB corpus plus 256 MB: the corpus is 4x that allowance, and the cap is enforced by a memory
    cgroup where the machine allows one (peak RSS is compared either way)."""
    small = tmp_path / "small"
    big = tmp_path / "big"
    assert prepare_cli(linked_corpus(tmp_path / "src_small", 1), small, tok).wait() == 0
    proc = prepare_cli(linked_corpus(tmp_path / "src_big", 520), big, tok, "--workers", "2")
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    corpus_bytes = sum(p.stat().st_size for p in big.glob("*.tok"))
    common = ["tiny", "model.vocab_size=512", "train.steps=4", "train.eval_every=0", "train.final_eval=false",
              "checkpoint.every=1000", "data.workers=1"]
    rc, err, base_rss = _train_rusage([*common, f"data.path={small}", f"train.run_dir={tmp_path / 'r1'}"])
    assert rc == 0, err[-2000:]
    allowance = 256 << 20
    assert corpus_bytes > 4 * allowance
    cgroup = memory_cgroup(base_rss + allowance)
    try:
        rc, err, big_rss = _train_rusage([*common, f"data.path={big}", f"train.run_dir={tmp_path / 'r2'}"], cgroup)
    finally:
        if cgroup is not None:
            remove_cgroup(cgroup)
    assert rc == 0, err[-2000:]
    print(f"corpus {corpus_bytes / 1e6:.0f} MB of tokens; peak RSS {base_rss / 1e6:.0f} MB on the small corpus, "
          f"{big_rss / 1e6:.0f} MB on the big one; cgroup cap: {'yes' if cgroup else 'no'}")
    assert big_rss < base_rss + allowance, (base_rss, big_rss, corpus_bytes)


def test_a_directory_of_record_files_is_one_unit_per_file(tmp_path, tok):
    """JSONL and Parquet files in a directory are records (one document each, split by file and
    index), prepared in parallel; the other files stay whole documents."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "src"
    (src / "web").mkdir(parents=True)
    texts = [f"record {i}: " + "def f(x):\n    return x\n" * (i % 7 + 1) for i in range(300)]
    (src / "web" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:100]))
    (src / "web" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[100:200]))
    pq.write_table(pa.table({"text": texts[200:] + [None], "id": list(range(101))}), src / "web" / "c.parquet",
                   row_group_size=16)
    (src / "readme.txt").write_text("a whole document\n")
    units = data.corpus.corpus_units(str(src))
    assert [(u.kind, Path(u.root).name) for u in units] == \
        [("files", "src"), ("jsonl", "a.jsonl"), ("jsonl", "b.jsonl"), ("parquet", "c.parquet")]
    docs = {s: [] for s in ("train", "val")}
    for u in units:
        for split, text in data.corpus.unit_documents(u, 0.2, "text"):
            docs[split].append(text)
    assert sorted(docs["train"] + docs["val"]) == sorted(texts + ["a whole document\n"])
    assert 30 < len(docs["val"]) < 100
    proc = prepare_cli(src, tmp_path / "out", tok, "--val-fraction", "0.2", "--workers", "2")
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    m = read_manifest(tmp_path / "out")
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == \
        (len(docs["train"]), len(docs["val"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(data.DataError, match=r"bad.parquet has no column 'text' \(data.jsonl_field\); it has body"):
        list(data.corpus.unit_documents(data.corpus.corpus_units(str(tmp_path / "bad.parquet"))[0], 0.2, "text"))
