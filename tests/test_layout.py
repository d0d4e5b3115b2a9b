"""The layout of the ``f2l`` package (docs/internals.md, "Layers").

Read from the source with ``ast`` -- no module is imported for the static checks:

* the import graph of ``f2l/`` has no cycle. Every import counts: module level, inside a
  function, relative or absolute, ``importlib.import_module("f2l....")`` and the lazy
  ``_LAZY`` table of a package ``__init__`` (an import deferred into a function that only
  hides a cycle is still a cycle);
* every import goes to the same or a lower layer, the layers being the ones
  docs/internals.md assigns; that table lists exactly the modules of the tree;
* every ``from f2l.x import name`` names a submodule or a name bound at the top level of
  ``f2l.x``, and so does every entry of a module's ``__all__`` (a moved name whose old
  import was left behind fails here, without importing torch);
* no module is longer than ``MAX_LINES`` unless its docstring has a ``Length:`` paragraph
  saying why.

Then the public paths (``f2l.__all__``, DESIGN.md's names, the paths docs, tools and
benchmarks use) are imported for real.

On the tree before the package was layered (flat ``f2l/train.py`` of 1.2k lines,
``f2l.config`` -> ``f2l.hypernet`` -> ``f2l.adapter`` -> ``f2l.config`` and
``f2l.infer`` <-> ``f2l.shard``), ``test_no_import_cycle``, ``test_long_modules_say_why``
and ``test_internals_lists_the_tree_by_layer`` fail; ``test_checker_*`` show on small
planted packages that each checker can fail.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "f2l"
INTERNALS = ROOT / "docs" / "internals.md"
MAX_LINES = 600

# Paths outside the package (DESIGN.md, README.md, docs/, tools/, benchmarks/, the tests, the
# console script) rely on; each must import and carry these names.
PUBLIC = {
    "f2l": None,  # None: the module's own __all__
    "f2l.train": ["Trainer", "TrainConfig", "Example", "Stage", "VideoStore", "ShuffledSource", "SegmentSource",
                  "answer_loss", "cosine_schedule", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
                  "train", "add_train_arguments", "config_from_args", "segment_key", "METRICS",
                  "_write_json_atomic"],
    "f2l.video": ["Video", "load_video", "sample_indices", "preprocess_frames", "DEFAULT_LONGEST_EDGE"],
    "f2l.presets": ["load_base", "BaseVLM", "fingerprint", "save_base", "tokens_per_frame", "TINY_TEXT",
                    "TINY_VISION"],
    "f2l.tokenizer": ["CHAT_TEMPLATE", "IMAGE_TOKEN", "EOS_TOKEN", "build_tokenizer"],
    "f2l.prompt": ["video_prompt", "question_prompt", "answer_text", "CHAT_TEMPLATE"],
    "f2l.encode": ["encode_videos", "EncodedVideos", "prompt_ids", "multimodal_embeds"],
    "f2l.generate": ["generate", "pad_labelled", "position_ids_from_mask"],
    "f2l.config": ["F2LConfig", "DEFAULT_INSTRUCTION", "DEFAULT_LONGEST_EDGE", "OutputLock", "OutputBusyError",
                   "atomic_write_text", "atomic_write_bytes", "atomic_dir", "atomic_save_safetensors",
                   "check_finite", "check_device"],
    "f2l.hypernet": ["HypernetConfig", "Frames2LoRAHypernet", "AdapterTensors", "default_lora_alpha",
                     "HYPERNET_PRESETS"],
    "f2l.adapter": ["VideoAdapter"],
    "f2l.layers": ["apply_f2l", "F2LPatch", "AdapterPool", "LoRALinear", "find_decoder_layers"],
    "f2l.model": ["Frames2LoRA"],
    "f2l.convert": ["load_official", "read_official", "convert_checkpoint", "infer_config"],
    "f2l.export": ["export_peft"],
    "f2l.shard": ["parse_shard", "in_shard", "select", "shard_path", "merge_predictions"],
    "f2l.infer": ["run_inference", "read_predictions"],
    "f2l.teacher": ["run_teacher", "load_teacher", "PARTIAL_SUFFIX"],
    "f2l.eval": ["evaluate", "exact_match", "compare"],
    "f2l.demo": ["run_demo", "add_demo_arguments"],
    "f2l.data": None,
    "f2l.data.manifest": None,
    "f2l.data.synthetic": None,
    "f2l.data.pretrain_tiny": ["load_seeing_base"],
    "f2l.cli": ["main", "CommandError", "_COMMANDS"],
}


# --------------------------------------------------------------------------- reading the tree


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package directory."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(module: str, path: Path, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    parts = module.split(".") if _is_package(path) else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _lazy_table(tree: ast.Module):
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "_LAZY" and isinstance(node.value, ast.Dict):
            yield from zip(node.value.keys, node.value.values)


def raw_imports(module: str, path: Path, tree: ast.Module):
    """``(line, module, name)`` for every import anywhere in the file (``name`` None for
    ``import x`` and dynamic imports)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node.level, node.module)
            for a in node.names:
                yield node.lineno, base, a.name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value, None
    for _key, value in _lazy_table(tree):
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            yield value.lineno, value.value, None


def top_level_names(tree: ast.Module) -> set[str]:
    """Names bound at module level (through ``if``/``try``/``with`` blocks too), plus the
    keys of a lazy ``_LAZY`` table."""
    names: set[str] = set()

    def bind(target):
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                bind(t)
        elif isinstance(target, ast.Starred):
            bind(target.value)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    bind(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                bind(node.target)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    names.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    names.add(a.asname or a.name)
            for field in ("body", "orelse", "finalbody"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []) or [])
            for h in getattr(node, "handlers", []) or []:
                visit(h.body)

    visit(tree.body)
    names.update(k.value for k, _ in _lazy_table(tree) if isinstance(k, ast.Constant))
    return names


class Tree:
    """The parsed package: modules, their import edges and the problems found reading them."""

    def __init__(self, root: Path, package: str):
        self.root, self.package = root, package
        self.files = find_modules(root, package)
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in self.files.items()}
        self.names = {m: top_level_names(t) for m, t in self.trees.items()}
        self.edges: dict[str, dict[str, int]] = {m: {} for m in self.files}  # a -> {b: first line}
        self.problems: list[str] = []
        for m, tree in self.trees.items():
            for line, base, name in raw_imports(m, self.files[m], tree):
                self._add(m, line, base, name)

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def where(self, m: str, line: int) -> str:
        return f"{self.files[m].relative_to(self.root)}:{line}"

    def _add(self, m: str, line: int, base: str, name: str | None) -> None:
        if not self._ours(base):
            return
        if name is None:  # import a.b.c binds a but runs (depends on) a.b.c
            if base not in self.files:
                self.problems.append(f"{self.where(m, line)}: imports {base}, which is not a module of the tree")
                return
            target = base
        elif f"{base}.{name}" in self.files:
            target = f"{base}.{name}"
        elif base not in self.files:
            self.problems.append(f"{self.where(m, line)}: imports from {base}, which is not a module of the tree")
            return
        else:
            target = base
            if name != "*" and name not in self.names[base]:
                self.problems.append(f"{self.where(m, line)}: imports {name!r} from {base}, which does not define it")
        self.edges[m].setdefault(target, line)

    def all_problems(self) -> list[str]:
        """``__all__`` entries that the module does not bind."""
        out = []
        for m, tree in self.trees.items():
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                        for t in node.targets):
                    for e in ast.literal_eval(node.value):
                        if e not in self.names[m] and f"{m}.{e}" not in self.files:
                            out.append(f"{self.where(m, node.lineno)}: __all__ names {e!r}, which {m} does not bind")
        return out

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module, or a module importing itself."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        out: list[list[str]] = []

        def connect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in self.edges[v]:
                if w not in index:
                    connect(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in self.edges[v]:
                    out.append(sorted(comp))

        for v in self.files:
            if v not in index:
                connect(v)
        return out

    def describe(self, comp: list[str]) -> str:
        inside = set(comp)
        edges = [f"{a} -> {b} ({self.where(a, line)})" for a in comp for b, line in sorted(self.edges[a].items())
                 if b in inside]
        return "cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)

    def long_modules_without_reason(self, max_lines: int) -> list[str]:
        out = []
        for m, path in self.files.items():
            n = len(path.read_text(encoding="utf-8").splitlines())
            doc = ast.get_docstring(self.trees[m]) or ""
            if n > max_lines and not re.search(r"^\s*Length:\s*\S.{30,}", doc, re.M):
                out.append(f"{path.relative_to(self.root)}: {n} lines (> {max_lines}) and its docstring has no "
                           f"'Length:' paragraph saying why")
        return out


def read_layers(internals: Path, package: str) -> dict[str, int]:
    """``file -> layer`` from the module-map rows ``| `f2l/x.py` | 3 | ... |`` of internals.md."""
    rows = re.findall(r"^\|\s*`(" + package + r"/[\w/]+\.py)`\s*\|\s*(\d+)\s*\|", internals.read_text(), re.M)
    return {f: int(n) for f, n in rows}


def layer_problems(tree: Tree, layers: dict[str, int]) -> list[str]:
    files = {m: str(p.relative_to(tree.root)) for m, p in tree.files.items()}
    out = [f"{f}: in the tree but not in the layer table of docs/internals.md" for f in sorted(files.values())
           if f not in layers]
    out += [f"{f}: in the layer table of docs/internals.md but not in the tree" for f in sorted(layers)
            if f not in set(files.values())]
    for a, targets in tree.edges.items():
        for b, line in targets.items():
            la, lb = layers.get(files[a]), layers.get(files[b])
            if la is not None and lb is not None and lb > la:
                out.append(f"{tree.where(a, line)}: {a} (layer {la}) imports {b} (layer {lb}), a higher layer")
    return out


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree(ROOT, PACKAGE)


# --------------------------------------------------------------------------- the checks


def test_imports_resolve(tree):
    assert not tree.problems, "\n".join(tree.problems)


def test_all_names_are_bound(tree):
    problems = tree.all_problems()
    assert not problems, "\n".join(problems)


def test_no_import_cycle(tree):
    cycles = tree.cycles()
    assert not cycles, "\n".join(tree.describe(c) for c in cycles)


def test_internals_lists_the_tree_by_layer(tree):
    layers = read_layers(INTERNALS, PACKAGE)
    assert layers, f"{INTERNALS}: no module-map rows of the form | `f2l/x.py` | <layer> | ... |"
    problems = layer_problems(tree, layers)
    assert not problems, "\n".join(problems)


def test_long_modules_say_why(tree):
    problems = tree.long_modules_without_reason(MAX_LINES)
    assert not problems, "\n".join(problems)


def test_kernels_never_import_the_model_layer():
    kernels = Tree(ROOT, "f2l_kernels")
    bad = []
    for m, t in kernels.trees.items():
        for line, base, _ in raw_imports(m, kernels.files[m], t):
            top = base.split(".")[0]
            if top in (PACKAGE, "transformers"):
                bad.append(f"{kernels.where(m, line)}: imports {base}")
    assert not bad, "\n".join(bad)


def test_public_paths_are_static_names(tree):
    missing = []
    for mod, names in PUBLIC.items():
        if mod not in tree.files:
            missing.append(f"{mod}: not a module of the tree")
            continue
        for n in names or []:
            if n not in tree.names[mod] and f"{mod}.{n}" not in tree.files:
                missing.append(f"{mod}.{n}: not bound in {tree.files[mod].relative_to(ROOT)}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("mod", list(PUBLIC))
def test_public_path_imports(mod):
    m = importlib.import_module(mod)
    names = PUBLIC[mod] if PUBLIC[mod] is not None else m.__all__
    assert names
    missing = [n for n in names if not hasattr(m, n)]
    assert not missing, f"{mod}: no {missing}"


# --------------------------------------------------------------------------- the checkers can fail


def _plant(tmp_path: Path, files: dict[str, str]) -> Tree:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return Tree(tmp_path, "pkg")


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    t = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import g\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from pkg import c\n    return c.h()\n",
        "pkg/c.py": "def h():\n    from .a import f\n    return f\n",
        "pkg/d.py": "import pkg.a\n",
    })
    assert t.cycles() == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.c -> pkg.a (pkg/c.py:2)" in t.describe(t.cycles()[0])


def test_checker_finds_a_cycle_through_a_package_init_and_a_lazy_table(tmp_path):
    t = _plant(tmp_path, {
        "pkg/__init__.py": "_LAZY = {'Thing': 'pkg.sub.thing'}\n",
        "pkg/sub/__init__.py": "from pkg.sub.thing import Thing\n",
        "pkg/sub/thing.py": "class Thing:\n    pass\n",
        "pkg/sub/other.py": "def f():\n    from pkg.sub import Thing\n    return Thing\n",
        "pkg/sub/helper.py": "from pkg import Thing\n",
    })
    assert t.cycles() == []  # the package imports its children; a child reaching up is fine until it cycles
    assert t.edges["pkg"] == {"pkg.sub.thing": 1} and t.edges["pkg.sub.other"] == {"pkg.sub": 2}
    (tmp_path / "pkg/sub/thing.py").write_text("import importlib\nclass Thing:\n    pass\n"
                                               "def f():\n    return importlib.import_module('pkg.sub.other')\n")
    assert Tree(tmp_path, "pkg").cycles() == [["pkg.sub", "pkg.sub.other", "pkg.sub.thing"]]


def test_checker_finds_stale_imports_long_modules_and_layer_breaks(tmp_path):
    t = _plant(tmp_path, {
        "pkg/__init__.py": "__all__ = ['gone']\n",
        "pkg/low.py": '"""Low.\n\nLength: it is long on purpose, to show that a stated reason passes."""\n'
                      + "x = 1\n" * 20 + "def f():\n    from pkg.high import y\n",
        "pkg/high.py": '"""High."""\nfrom pkg.low import x, moved\nfrom pkg.nowhere import z\n' + "y = 2\n" * 20,
    })
    assert sorted(p.split(": ", 1)[1] for p in t.problems) == [
        "imports 'moved' from pkg.low, which does not define it",
        "imports from pkg.nowhere, which is not a module of the tree"]
    assert t.all_problems() == ["pkg/__init__.py:1: __all__ names 'gone', which pkg does not bind"]
    assert t.long_modules_without_reason(10) == ["pkg/high.py: 23 lines (> 10) and its docstring has no 'Length:' "
                                                 "paragraph saying why"]
    doc = tmp_path / "internals.md"
    doc.write_text("| file | layer | owns |\n| --- | --- | --- |\n| `pkg/__init__.py` | 2 | x |\n"
                   "| `pkg/low.py` | 0 | x |\n| `pkg/high.py` | 1 | x |\n| `pkg/old.py` | 1 | x |\n")
    assert layer_problems(t, read_layers(doc, "pkg")) == [
        "pkg/old.py: in the layer table of docs/internals.md but not in the tree",
        "pkg/low.py:25: pkg.low (layer 0) imports pkg.high (layer 1), a higher layer"]
