"""A damaged token cache is rebuilt, never trained on; killed builds leave no litter."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, compose


def stages(cache):
    path = cache / "builds.log"
    return [json.loads(line)["stage"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_damaged_cache_file_is_named_and_its_stage_rebuilt(tmp_path, tiny_corpus, caplog):
    from gptlab.data.prepare import prepare

    cfg = compose(["debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2"])
    cache = tmp_path / "cache"
    first = prepare(cfg, cache, show_progress=False)
    n_train, tokens_dir = len(first.train), first.info["cache_dir"]
    assert stages(cache) == ["splits", "tokenizers", "tokens"]

    train_bin = next((cache / "tokens").glob("*/train.bin"))
    size = train_bin.stat().st_size
    os.truncate(train_bin, size // 2)  # the probe: half the file
    again = prepare(cfg, cache, show_progress=False)
    assert f"the tokens cache is damaged: {train_bin} has {size // 2} bytes, {size} when it was built" in caplog.text
    assert stages(cache)[3:] == ["tokens"] and len(again.train) == n_train and again.info["cache_dir"] == tokens_dir

    # same size, other bytes: the sampled checksum sees it
    caplog.clear()
    data = bytearray(train_bin.read_bytes())
    data[10:20] = bytes(10)
    train_bin.write_bytes(bytes(data))
    prepare(cfg, cache, show_progress=False)
    assert f"{train_bin} changed since it was built (checksum)" in caplog.text and stages(cache)[4:] == ["tokens"]

    # the tokenizer stage: a truncated tokenizer.json is rebuilt, to the same tokenizer
    caplog.clear()
    tok_json = next((cache / "tokenizers").glob("*/tokenizer.json"))
    tok_json.write_text(tok_json.read_text()[:100])
    prepare(cfg, cache, show_progress=False)
    assert f"the tokenizers cache is damaged: {tok_json} has" in caplog.text
    assert stages(cache)[5:] == ["tokenizers"]  # the same tokenizer again: the token cache still fits

    # the split stage: its meta.json is its only file
    caplog.clear()
    split_meta = next((cache / "splits").glob("*/meta.json"))
    split_meta.write_text(split_meta.read_text()[:50])
    prepare(cfg, cache, show_progress=False)
    assert f"the splits cache is damaged: {split_meta} is unreadable" in caplog.text
    assert stages(cache)[6:] == ["splits"]


def test_a_waiting_rank_never_reads_a_damaged_cache(tmp_path):
    import threading

    from gptlab.data.cache import build_once

    def build(tmp):
        (tmp / "x.bin").write_bytes(b"abcd" * 100)
        return {}

    d = build_once(tmp_path / "stage" / "key", build, True)
    os.truncate(d / "x.bin", 10)
    got = []
    waiter = threading.Thread(target=lambda: got.append(build_once(d, build, False, poll_s=0.05)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got  # it waits for the builder instead of reading 10 bytes
    build_once(d, build, True)
    waiter.join(5)
    assert got == [d] and (d / "x.bin").stat().st_size == 400


BUILDER = """
import sys, time
from pathlib import Path
from gptlab.data.cache import build_once

def build(tmp):
    (tmp / "train.bin").write_bytes(b"0" * 1000)
    print("building", flush=True)
    time.sleep(600)

build_once(Path(sys.argv[1]), build, True)
"""


def start_builder(directory):
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(directory)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "building\n"
    return proc


def test_the_next_build_removes_a_killed_builds_litter_but_not_a_live_ones(tmp_path):
    from gptlab.data.cache import build_once

    stage = tmp_path / "tokens"
    a, b, c, d, e = (c * 16 for c in "abcde")  # the stage's entries are named by 16-hex fingerprints
    killed, live = start_builder(stage / a), start_builder(stage / b)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        litter, busy = stage / f"{a}.tmp{killed.pid}", stage / f"{b}.tmp{live.pid}"
        assert litter.is_dir() and busy.is_dir()
        # from another host (a shared file system), or of unknown origin: only age tells
        foreign = stage / f"{c}.tmp12345"
        foreign.mkdir()
        (foreign / ".builder.json").write_text(json.dumps({"host": socket.gethostname() + "-other", "pid": 1,
                                                           "started": 0}))
        fresh_foreign = stage / f"{d}.tmp12346"
        fresh_foreign.mkdir()
        (fresh_foreign / "train.bin").write_bytes(b"1")
        not_ours = stage / "notes.tmp12347"  # cache_dir may be a shared directory: never gptlab's to delete
        not_ours.mkdir()
        old = time.time() - 2 * 24 * 3600
        for path in (foreign / ".builder.json", foreign, not_ours):
            os.utime(path, (old, old))

        build_once(stage / e, lambda tmp: {}, True)  # any build of the stage cleans up
        assert not litter.exists() and not foreign.exists()
        assert busy.is_dir() and fresh_foreign.is_dir() and not_ours.is_dir()
        assert sorted(p.name for p in stage.iterdir()) == sorted([f"{b}.tmp{live.pid}", f"{d}.tmp12346", e,
                                                                  "notes.tmp12347"])
    finally:
        live.kill()
        live.wait(10)
