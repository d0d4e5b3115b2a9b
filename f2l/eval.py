"""``f2l eval``: compare two systems' answers on the same examples, with paired statistics.

    f2l eval --base in_context.jsonl --v2l adapter.jsonl [--manifest test.jsonl] --out eval.json

Inputs are JSONL files, one row per example, keyed by the manifest ``id``. A prediction
row carries the system's answer under ``prediction`` (or ``pred``/``output``/``response``/
``generated``); the reference answer comes from ``--manifest`` (the authors' format:
``target_text``; an ``answers`` list in ``metadata`` adds alternatives) or, without a
manifest, from the prediction rows themselves (``target_text``/``target``/``reference``/
``answers``). Both systems must answer exactly the same ids.

Per example and metric, the score of each system is

* ``em`` -- exact match after SQuAD normalisation (lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed), max over the references;
* ``f1`` -- SQuAD token F1 of the normalised answers, max over the references;

and the paired difference ``d_i = score_v2l(i) - score_base(i)``. Per group (``task_type``
by default, or any row field / ``metadata.<key>``) and over all examples:

* ``delta`` = mean d_i, and its ``confidence`` (default 95%) percentile interval from a
  paired bootstrap (examples resampled with replacement, the same resample for both
  systems; ``n_boot`` resamples, seeded -- the same inputs give the same interval);
* ``eq`` -- equivalence by two one-sided tests at margin ``margin``: the interval lies
  inside ``(-margin, +margin)``. With the 95% interval this is TOST at alpha = 0.025
  per side (conservative against the 90%-interval convention; pass
  ``--confidence 0.90`` for that one);
* ``ni`` -- non-inferiority of V2L at margin ``margin``: the interval's lower end is
  above ``-margin`` (one-sided alpha = 0.025 with the 95% interval);
* ``p_tost``, ``p_ni`` -- the bootstrap p-values of those tests
  (``(#{delta* <= -margin} + 1) / (n_boot + 1)`` and its mirror; ``p_tost`` is the larger
  one-sided value).

The printed table follows the paper's layout: group, Base, V2L, Delta, CI, Eq, NI, n.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["normalize_answer", "exact_match", "token_f1", "paired_bootstrap", "PairedResult", "compare",
           "evaluate", "read_jsonl", "format_table", "add_eval_arguments", "run_eval_cli", "PRED_KEYS", "REF_KEYS"]

PRED_KEYS = ("prediction", "pred", "output", "response", "generated")
REF_KEYS = ("target_text", "target", "reference", "answers")
METRICS = ("em", "f1")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# --------------------------------------------------------------------------- scores


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    t = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def _refs(references) -> list[str]:
    if isinstance(references, str):
        return [references]
    if isinstance(references, (list, tuple)) and references and all(isinstance(r, str) for r in references):
        return list(references)
    raise TypeError(f"references: expected a str or a non-empty list of str, got {references!r}")


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in _refs(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD: two empty answers agree; an empty answer against a non-empty one scores 0.
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised answers, max over the references."""
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(r).split()) for r in _refs(references))


_SCORERS = {"em": exact_match, "f1": token_f1}


# --------------------------------------------------------------------------- statistics


@dataclass
class PairedResult:
    """Paired comparison of one metric on one group of examples."""

    n: int
    base: float
    v2l: float
    delta: float
    ci_low: float
    ci_high: float
    eq: bool
    ni: bool
    p_tost: float
    p_ni: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_level(name: str, v: float, lo_open: float, hi_open: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo_open < v < hi_open) or math.isnan(v):
        raise ValueError(f"{name}: expected a number in ({lo_open}, {hi_open}), got {v!r}")
    return float(v)


def _check_nboot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot: expected an int >= 1, got {n_boot!r}")
    return n_boot


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    return seed


def paired_bootstrap(diffs, *, n_boot: int = 10000, seed: int = 0, chunk_elems: int = 1 << 22) -> np.ndarray:
    """Means of ``n_boot`` bootstrap resamples of the paired differences ``diffs`` ``[n]``.

    Each resample draws ``n`` indices with replacement (numpy PCG64 seeded with
    ``seed``); returns float64 ``[n_boot]``. Deterministic in ``(diffs, n_boot, seed)``.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs: expected a non-empty 1-D array, got shape {list(d.shape)}")
    if not np.isfinite(d).all():
        raise ValueError("diffs: expected finite values, got NaN or inf")
    n_boot = _check_nboot(n_boot)
    rng = np.random.default_rng([_check_seed(seed), 0xB007])
    n = d.size
    per = max(1, chunk_elems // n)
    out = np.empty(n_boot, dtype=np.float64)
    for s in range(0, n_boot, per):
        m = min(per, n_boot - s)
        out[s:s + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def compare(base_scores, v2l_scores, *, margin: float = 0.05, confidence: float = 0.95, n_boot: int = 10000,
            seed: int = 0) -> PairedResult:
    """Paired Delta = mean(v2l - base), bootstrap CI, equivalence and non-inferiority."""
    b = np.asarray(base_scores, dtype=np.float64)
    v = np.asarray(v2l_scores, dtype=np.float64)
    if b.shape != v.shape or b.ndim != 1:
        raise ValueError(f"v2l_scores: expected the shape of base_scores {list(b.shape)} (paired), "
                         f"got {list(v.shape)}")
    margin = _check_level("margin", margin, 0.0, math.inf)
    confidence = _check_level("confidence", confidence, 0.0, 1.0)
    d = v - b
    boot = paired_bootstrap(d, n_boot=n_boot, seed=seed)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], method="linear")
    # Float noise of a mean of identical values must not turn an exact 0 into -1e-17.
    lo, hi = float(np.round(lo, 12)), float(np.round(hi, 12))
    p_low = (int(np.sum(boot <= -margin)) + 1) / (n_boot + 1)  # H0: delta <= -margin
    p_high = (int(np.sum(boot >= margin)) + 1) / (n_boot + 1)  # H0: delta >= +margin
    return PairedResult(n=int(d.size), base=float(b.mean()), v2l=float(v.mean()), delta=float(d.mean()),
                        ci_low=lo, ci_high=hi, eq=bool(-margin < lo and hi < margin), ni=bool(lo > -margin),
                        p_tost=max(p_low, p_high), p_ni=p_low)


# --------------------------------------------------------------------------- rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file (blank lines and ``#`` lines skipped); errors name path:line."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: {path!r} does not exist")
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def _rows(x, name: str) -> list[dict]:
    if isinstance(x, (str, os.PathLike)):
        return read_jsonl(x)
    if isinstance(x, Mapping):
        return [{"id": k, "prediction": v} for k, v in x.items()]
    if isinstance(x, (list, tuple)) and all(isinstance(r, Mapping) for r in x):
        return [dict(r) for r in x]
    raise TypeError(f"{name}: expected a JSONL path, a list of row dicts or an {{id: prediction}} dict, "
                    f"got {type(x).__name__}")


def _by_id(rows: list[dict], name: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for j, r in enumerate(rows):
        rid = r.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ValueError(f"{name}[{j}]: expected an 'id' (str), got {rid!r}")
        rid = str(rid)
        if rid in out:
            raise ValueError(f"{name}: id {rid!r} appears more than once")
        out[rid] = r
    return out


def _field(row: Mapping, keys: Sequence[str]):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    return None


def _group_of(row: Mapping | None, key: str) -> str:
    if row is None:
        return "(none)"
    v: Any = row
    for part in key.split("."):
        v = v.get(part) if isinstance(v, Mapping) else None
    return "(none)" if v is None or v == "" else str(v)


def evaluate(base, v2l, references=None, *, margin: float = 0.05, confidence: float = 0.95, n_boot: int = 10000,
             seed: int = 0, group_by: str | None = "task_type", metrics: Sequence[str] = METRICS,
             pred_key: str | None = None, keep_examples: bool = False) -> dict:
    """Compare two systems' predictions on the same examples.

    base, v2l: JSONL paths, lists of rows (``{"id", "prediction", ...}``) or ``{id: text}``.
    references: a manifest (path or rows, ``target_text`` + optional ``metadata.answers``),
      or None to read the references from the prediction rows.
    Returns ``{"settings", "groups": {metric: {group: PairedResult dict}}, "n"}`` with a
    group ``"all"``; ``keep_examples`` adds the per-example scores and differences.
    """
    metrics = tuple(metrics)
    if not metrics or any(m not in _SCORERS for m in metrics):
        raise ValueError(f"metrics: expected a non-empty subset of {METRICS}, got {metrics!r}")
    if group_by is not None and (not isinstance(group_by, str) or not group_by):
        raise TypeError(f"group_by: expected None or a field name, got {group_by!r}")
    pkeys = (pred_key,) if pred_key else PRED_KEYS
    b_rows, v_rows = _by_id(_rows(base, "base"), "base"), _by_id(_rows(v2l, "v2l"), "v2l")
    only_b, only_v = sorted(set(b_rows) - set(v_rows)), sorted(set(v_rows) - set(b_rows))
    if only_b or only_v:
        raise ValueError(f"v2l: the two systems must answer the same ids; only in base: {only_b[:5]}"
                         f"{'...' if len(only_b) > 5 else ''} ({len(only_b)}), only in v2l: {only_v[:5]}"
                         f"{'...' if len(only_v) > 5 else ''} ({len(only_v)})")
    if not b_rows:
        raise ValueError("base: expected at least one prediction row, got none")
    ref_rows = _by_id(_rows(references, "references"), "references") if references is not None else None
    ids = sorted(b_rows)
    if ref_rows is not None:
        missing = [i for i in ids if i not in ref_rows]
        if missing:
            raise ValueError(f"references: no manifest row for ids {missing[:5]} ({len(missing)} in all)")
    refs, groups = {}, {}
    for i in ids:
        if ref_rows is not None:
            mr = ref_rows[i]
            r = mr.get("target_text")
            alts = (mr.get("metadata") or {}).get("answers") if isinstance(mr.get("metadata"), Mapping) else None
            cand = ([r] if isinstance(r, str) and r.strip() else []) + (list(alts) if isinstance(alts, list) else [])
            src = mr
        else:
            r = _field(b_rows[i], REF_KEYS)
            if r is None:
                r = _field(v_rows[i], REF_KEYS)
            cand = [r] if isinstance(r, str) else list(r) if isinstance(r, list) else []
            src = b_rows[i]
        cand = [c for c in cand if isinstance(c, str)]
        if not cand:
            raise ValueError(f"references: example {i!r} has no reference answer "
                             f"({'target_text in the manifest' if ref_rows is not None else '/'.join(REF_KEYS)})")
        refs[i] = cand
        groups[i] = _group_of(src, group_by) if group_by else "all"
    preds = {}
    for name, rows in (("base", b_rows), ("v2l", v_rows)):
        out = []
        for i in ids:
            p = _field(rows[i], pkeys)
            if not isinstance(p, str):
                raise ValueError(f"{name}: example {i!r} has no prediction (expected a str under "
                                 f"{' / '.join(pkeys)}), got {p!r}")
            out.append(p)
        preds[name] = out
    result: dict[str, Any] = {
        "settings": {"margin": margin, "confidence": confidence, "n_boot": n_boot, "seed": seed,
                     "group_by": group_by, "metrics": list(metrics),
                     "eq_rule": "CI inside (-margin, +margin) (TOST)", "ni_rule": "CI lower end > -margin"},
        "n": len(ids), "groups": {},
    }
    names = sorted(set(groups.values()))
    examples = {}
    for m in metrics:
        f = _SCORERS[m]
        sb = np.array([f(p, refs[i]) for p, i in zip(preds["base"], ids)])
        sv = np.array([f(p, refs[i]) for p, i in zip(preds["v2l"], ids)])
        per = {}
        sel_all = np.ones(len(ids), dtype=bool)
        for gi, g in enumerate(names + ["all"]):
            sel = sel_all if g == "all" else np.array([groups[i] == g for i in ids])
            # A distinct stream per group keeps one group's interval independent of the others.
            per[g] = compare(sb[sel], sv[sel], margin=margin, confidence=confidence, n_boot=n_boot,
                             seed=seed * 1009 + gi).to_dict()
        result["groups"][m] = per
        examples[m] = (sb, sv)
    if keep_examples:
        result["examples"] = [
            {"id": i, "group": groups[i], "base": preds["base"][j], "v2l": preds["v2l"][j], "references": refs[i],
             **{f"{m}_base": float(examples[m][0][j]) for m in metrics},
             **{f"{m}_v2l": float(examples[m][1][j]) for m in metrics},
             **{f"{m}_diff": float(examples[m][1][j] - examples[m][0][j]) for m in metrics}}
            for j, i in enumerate(ids)]
    return result


# --------------------------------------------------------------------------- output


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def format_table(result: Mapping, *, labels: tuple[str, str] = ("Base", "V2L"), scale: float = 100.0) -> str:
    """The paper's layout, one block per metric: group, Base, V2L, Delta, CI, Eq, NI, n.

    Scores are printed x ``scale`` (percent by default).
    """
    st = result["settings"]
    lines = []
    for m, per in result["groups"].items():
        head = ["", labels[0], labels[1], "Δ", f"{round(100 * st['confidence'])}% CI", "Eq", "NI", "n"]
        body = []
        for g, r in per.items():
            body.append([g, f"{scale * r['base']:.1f}", f"{scale * r['v2l']:.1f}", f"{scale * r['delta']:+.1f}",
                         f"[{scale * r['ci_low']:+.1f}, {scale * r['ci_high']:+.1f}]", _yn(r["eq"]), _yn(r["ni"]),
                         str(r["n"])])
        w = [max(len(row[c]) for row in [head] + body) for c in range(len(head))]
        fmt = lambda row: "  ".join(x.ljust(w[0]) if c == 0 else x.rjust(w[c]) for c, x in enumerate(row))
        title = (f"{m.upper()} ({'exact match' if m == 'em' else 'token F1'}), margin ±{scale * st['margin']:.1f}, "
                 f"paired bootstrap n={st['n_boot']} seed={st['seed']}")
        rule = "-" * max(len(title), sum(w) + 2 * (len(w) - 1))
        lines += [title, rule, fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1]), rule, ""]
    return "\n".join(lines).rstrip() + "\n"


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``f2l eval``."""
    parser.add_argument("--base", required=True, help="JSONL predictions of the baseline (e.g. video in context)")
    parser.add_argument("--v2l", required=True, help="JSONL predictions of the adapter system")
    parser.add_argument("--manifest", default=None,
                        help="JSONL manifest with the references (target_text); default: read them from the "
                             "prediction rows")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--margin", type=float, default=0.05, help="equivalence / non-inferiority margin, as a "
                        "fraction of the metric (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95, help="CI level (default: %(default)s)")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--group-by", default="task_type",
                        help="row field that groups examples ('metadata.kind' reaches into metadata; "
                             "'none' for one group; default: %(default)s)")
    parser.add_argument("--metrics", default="em,f1", help="comma-separated subset of em,f1 (default: %(default)s)")
    parser.add_argument("--pred-key", default=None, help=f"prediction field (default: the first of {PRED_KEYS})")
    parser.add_argument("--examples", action="store_true", help="include per-example scores in the JSON")
    return parser


def run_eval_cli(args) -> int:
    """``f2l eval``: print the table, optionally write JSON (atomically)."""
    from f2l.config import atomic_write_text

    group_by = None if str(args.group_by).lower() in ("none", "") else args.group_by
    metrics = tuple(m.strip() for m in str(args.metrics).split(",") if m.strip())
    result = evaluate(args.base, args.v2l, args.manifest, margin=args.margin, confidence=args.confidence,
                      n_boot=args.n_boot, seed=args.seed, group_by=group_by, metrics=metrics,
                      pred_key=args.pred_key, keep_examples=bool(args.examples))
    print(format_table(result), end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0

