"""--shard i/n for internalize and infer: n workers cover the corpus once, and --merge joins them."""
import json
import os

import pytest

from f2l.shard import in_shard, merge_predictions, parse_shard, select, shard_path
from test_cli import run, work  # noqa: F401  (the CLI fixture: three videos, a manifest, a hypernetwork)


@pytest.mark.parametrize("spec, want", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2)), (None, None)])
def test_parse_shard(spec, want):
    assert parse_shard(spec) == want


@pytest.mark.parametrize("spec", ["4/4", "-1/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_parse_shard_rejects(spec):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(spec)


def test_parse_shard_rank(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard("rank") == (2, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("rank")


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_the_keys(n):
    keys = [f"id-{i}" for i in range(500)] + ["ü/ñ.mp4", ""]
    parts = [select(keys, keys, (i, n)) for i in range(n)]
    assert sorted(k for p in parts for k in p) == sorted(keys)  # every key once
    assert all(len(set(p)) == len(p) for p in parts)
    if n > 1:  # and the split is not degenerate
        assert all(len(p) > 500 / n / 2 for p in parts)
    # order inside a shard is the input order, and membership ignores that order
    assert select(keys[::-1], keys[::-1], (0, n)) == parts[0][::-1]
    assert in_shard("x", None)


def test_shard_path():
    assert shard_path("out/p.jsonl", None) == "out/p.jsonl"
    assert shard_path("out/p.jsonl", (1, 4)) == "out/p.shard-1-of-4.jsonl"
    assert shard_path("p", (0, 2)) == "p.shard-0-of-2.jsonl"


def test_infer_shards_cover_the_manifest_and_merge(work, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "pred.jsonl"
    base = ["infer", "--manifest", work / "m.jsonl", "--output", out, "--hypernet", work / "hn",
            "--max-new-tokens", 3, "--no-progress"]
    code, _, err = run(base + ["--merge", 2], capsys)  # nothing to merge yet
    assert code == 2 and "shard file" in err
    for i in range(2):
        code, _, err = run(base + ["--shard", f"{i}/2"], capsys)
        assert code == 0, err
    ids = [[json.loads(x)["id"] for x in open(shard_path(str(out), (i, 2)))] for i in range(2)]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == [f"r{i}" for i in range(5)]
    assert not out.exists()
    code, stdout, err = run(base + ["--merge", 2], capsys)
    assert code == 0, err and "5 rows" in stdout
    merged = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in merged] == [f"r{i}" for i in range(5)]  # manifest order, once each
    # the same predictions as one unsharded run
    single = tmp_path / "single.jsonl"
    code, _, err = run(["infer", "--manifest", work / "m.jsonl", "--output", single, "--hypernet", work / "hn",
                        "--max-new-tokens", 3, "--no-progress"], capsys)
    assert code == 0, err
    assert [r["prediction"] for r in merged] == [json.loads(x)["prediction"] for x in single.read_text().splitlines()]
    # a shard file that lost rows: the merge reports them missing and exits non-zero
    p0 = shard_path(str(out), (0, 2))
    lines = open(p0).read().splitlines()
    if lines:
        with open(p0, "w") as f:
            f.write("\n".join(lines[1:]) + ("\n" if len(lines) > 1 else ""))
        r = merge_predictions(str(work / "m.jsonl"), str(out), 2)
        assert r["missing"] == [json.loads(lines[0])["id"]]
    code, _, err = run(base + ["--merge", 2, "--shard", "0/2"], capsys)
    assert code == 2 and "--merge" in err
    code, _, err = run(base + ["--shard", "2/2"], capsys)
    assert code == 2 and "shard" in err


def test_internalize_shards_cover_the_videos_once(work, tmp_path, capsys):  # noqa: F811
    videos = [work / f"v{i}.mp4" for i in range(3)]
    for i in range(3):
        code, _, err = run(["internalize", *videos, "-o", tmp_path / "ads", "--hypernet", work / "hn",
                            "--shard", f"{i}/3"], capsys)
        assert code == 0, err
    assert sorted(os.listdir(tmp_path / "ads")) == ["v0.safetensors", "v1.safetensors", "v2.safetensors"]
