"""``f2l eval``: SQuAD scores and the paired statistics against closed-form cases."""
import json
import math

import numpy as np
import pytest

from f2l import eval as ev


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("pred, ref, em, f1", [
    ("The Cat.", "cat", 1.0, 1.0),
    ("  a   red circle!", "Red circle", 1.0, 1.0),
    ("red square", "a red circle", 0.0, 0.5),
    ("red red circle", "red circle", 0.0, 0.8),  # P = 2/3 (one 'red' matched once), R = 1
    ("", "", 1.0, 1.0),
    ("", "blue", 0.0, 0.0),
    ("the", "an", 1.0, 1.0),  # both normalise to empty
], ids=["case-punct", "articles-space", "partial", "repeated-token", "both-empty", "empty-pred", "only-articles"])
def test_em_and_f1(pred, ref, em, f1):
    assert ev.exact_match(pred, ref) == em
    assert ev.token_f1(pred, ref) == pytest.approx(f1)


def test_multiple_references_take_the_max():
    assert ev.exact_match("left", ["right", "Left."]) == 1.0
    assert ev.token_f1("red ball", ["blue box", "red circle"]) == pytest.approx(0.5)
    with pytest.raises(TypeError, match="references"):
        ev.exact_match("x", [])
    with pytest.raises(TypeError, match="text"):
        ev.normalize_answer(3)


# --------------------------------------------------------------------------- statistics


def test_identical_systems():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 2, size=300).astype(float)
    r = ev.compare(s, s, margin=0.05, n_boot=2000, seed=0)
    assert (r.delta, r.ci_low, r.ci_high) == (0.0, 0.0, 0.0)
    assert r.eq and r.ni
    assert r.base == r.v2l == pytest.approx(s.mean())
    assert r.p_tost == pytest.approx(1 / 2001) and r.p_ni == pytest.approx(1 / 2001)


def test_constant_shift_has_a_degenerate_interval():
    b = np.ones(50)
    v = np.zeros(50)
    r = ev.compare(b, v, margin=0.05, n_boot=500)
    assert (r.delta, r.ci_low, r.ci_high) == (-1.0, -1.0, -1.0)
    assert not r.eq and not r.ni and r.p_ni == 1.0


def test_known_shift_matches_normal_theory():
    # base right everywhere; the adapter wrong on 40 of 400: delta = -0.1 exactly, and the
    # bootstrap distribution of the mean is ~ N(-0.1, p(1-p)/n) with p = 0.1.
    n, k = 400, 40
    b = np.ones(n)
    v = np.ones(n)
    v[np.random.default_rng(0).permutation(n)[:k]] = 0.0
    r = ev.compare(b, v, margin=0.05, n_boot=20000, seed=3)
    assert r.delta == pytest.approx(-0.1, abs=1e-12)
    se = math.sqrt(0.1 * 0.9 / n)
    assert r.ci_low == pytest.approx(-0.1 - 1.96 * se, abs=0.006)
    assert r.ci_high == pytest.approx(-0.1 + 1.96 * se, abs=0.006)
    assert not r.eq and not r.ni


def test_bootstrap_variance_is_the_plug_in_variance_over_n():
    rng = np.random.default_rng(5)
    d = rng.choice([-1.0, 0.0, 1.0], size=250, p=[0.2, 0.5, 0.3])
    boot = ev.paired_bootstrap(d, n_boot=20000, seed=1)
    assert boot.mean() == pytest.approx(d.mean(), abs=0.003)
    assert boot.std() == pytest.approx(d.std() / math.sqrt(d.size), rel=0.04)


def test_non_inferior_but_not_equivalent_and_equivalent():
    # +0.2 improvement: non-inferior, not equivalent
    b = np.zeros(500)
    v = np.zeros(500)
    v[:100] = 1.0
    r = ev.compare(b, v, margin=0.05, n_boot=4000)
    assert r.delta == pytest.approx(0.2) and r.ni and not r.eq
    # balanced +1/-1 flips on 2% of 2000 examples: delta 0, se ~0.003 -> equivalent
    b = np.zeros(2000)
    v = np.zeros(2000)
    b[:20] = 1.0
    v[20:40] = 1.0
    r = ev.compare(b, v, margin=0.05, n_boot=4000)
    assert r.delta == 0.0 and r.eq and r.ni and r.p_tost < 0.001
    # the same flips at a margin tighter than the noise: not equivalent
    assert not ev.compare(b, v, margin=0.002, n_boot=4000).eq


def test_bootstrap_is_seeded():
    d = np.random.default_rng(2).normal(size=64)
    a = ev.paired_bootstrap(d, n_boot=300, seed=7)
    assert np.array_equal(a, ev.paired_bootstrap(d, n_boot=300, seed=7))
    assert not np.array_equal(a, ev.paired_bootstrap(d, n_boot=300, seed=8))
    # chunking does not change the stream's result shape or determinism
    c = ev.paired_bootstrap(d, n_boot=300, seed=7, chunk_elems=64 * 7)
    assert c.shape == (300,) and np.array_equal(c, ev.paired_bootstrap(d, n_boot=300, seed=7, chunk_elems=64 * 7))


@pytest.mark.parametrize("kwargs, match", [
    (dict(margin=0.0), "margin"), (dict(margin=-0.1), "margin"), (dict(confidence=1.0), "confidence"),
    (dict(n_boot=0), "n_boot"), (dict(seed=-1), "seed"),
], ids=["margin-zero", "margin-neg", "confidence-one", "nboot-zero", "seed-neg"])
def test_compare_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.compare([1.0, 0.0], [1.0, 1.0], **kwargs)


def test_compare_needs_paired_inputs():
    with pytest.raises(ValueError, match="v2l_scores"):
        ev.compare([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="diffs"):
        ev.paired_bootstrap([])


# --------------------------------------------------------------------------- rows, groups, CLI


def _manifest_rows():
    rows = []
    for i in range(12):
        kind = "colour" if i % 2 == 0 else "shape"
        ans = "red" if kind == "colour" else "circle"
        rows.append({"id": f"v{i}", "video_path": f"v{i}.mp4", "prompt": "q?", "target_text": ans,
                     "task_type": "qa", "dataset": "syn", "split": "test",
                     "metadata": {"kind": kind, "answers": ["crimson"] if kind == "colour" else []}})
    return rows


def test_evaluate_groups_and_references():
    man = _manifest_rows()
    base = [{"id": r["id"], "prediction": r["target_text"]} for r in man]
    # v2l: every shape answer wrong, colour answers given as the alternative reference
    v2l = [{"id": r["id"], "prediction": "crimson" if r["metadata"]["kind"] == "colour" else "square"} for r in man]
    res = ev.evaluate(base, v2l, man, group_by="metadata.kind", n_boot=500, keep_examples=True)
    em = res["groups"]["em"]
    assert set(em) == {"colour", "shape", "all"}
    assert em["colour"]["delta"] == 0.0 and em["colour"]["eq"]
    assert em["shape"]["delta"] == -1.0 and not em["shape"]["ni"]
    assert em["all"]["delta"] == pytest.approx(-0.5) and em["all"]["n"] == 12
    assert res["n"] == 12 and len(res["examples"]) == 12
    table = ev.format_table(res)
    for word in ("Base", "V2L", "Δ", "95% CI", "Eq", "NI", "colour", "shape", "all"):
        assert word in table


def test_evaluate_references_from_prediction_rows_and_dict_inputs():
    base = {"a": "left", "b": "up"}
    v2l = [{"id": "a", "pred": "left"}, {"id": "b", "pred": "down"}]
    with pytest.raises(ValueError, match="references"):
        ev.evaluate(base, v2l, n_boot=10)
    base = [{"id": "a", "prediction": "left", "target_text": "left"}, {"id": "b", "prediction": "up",
                                                                       "target_text": "up"}]
    res = ev.evaluate(base, v2l, group_by=None, n_boot=50, metrics=("em",))
    assert list(res["groups"]) == ["em"] and res["groups"]["em"]["all"]["delta"] == -0.5


@pytest.mark.parametrize("v2l, match", [
    ([{"id": "a", "prediction": "x"}], "same ids"),
    ([{"id": "a", "prediction": "x"}, {"id": "b"}], "no prediction"),
    ([{"id": "a", "prediction": "x"}, {"id": "a", "prediction": "y"}], "more than once"),
], ids=["missing-id", "missing-prediction", "duplicate-id"])
def test_evaluate_rejects_bad_rows(v2l, match):
    base = [{"id": "a", "prediction": "x", "target": "x"}, {"id": "b", "prediction": "y", "target": "y"}]
    with pytest.raises(ValueError, match=match):
        ev.evaluate(base, v2l, n_boot=10)


def test_cli_eval_writes_json_and_prints_the_table(tmp_path, capsys):
    from f2l.cli import main

    man = _manifest_rows()
    paths = {}
    for name, preds in (("base", [r["target_text"] for r in man]), ("v2l", [r["target_text"] for r in man])):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": r["id"], "prediction": x}) + "\n" for r, x in zip(man, preds)))
        paths[name] = str(p)
    mp = tmp_path / "manifest.jsonl"
    mp.write_text("".join(json.dumps(r) + "\n" for r in man))
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", "--base", paths["base"], "--v2l", paths["v2l"], "--manifest", str(mp),
                 "--group-by", "metadata.kind", "--n-boot", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "EM (exact match)" in printed and "F1 (token F1)" in printed and "NI" in printed
    res = json.loads(out.read_text())
    assert res["groups"]["f1"]["all"]["eq"] is True and res["settings"]["n_boot"] == 200
    with pytest.raises(SystemExit) as e:
        main(["eval", "--base", str(tmp_path / "nope.jsonl"), "--v2l", paths["v2l"]])
    assert e.value.code == 2
    assert "nope.jsonl" in capsys.readouterr().err
