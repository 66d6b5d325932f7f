"""The contract of ../DESIGN.md, checked for every methods/*.py; and a check that this checker can fail."""

import ast
import dataclasses

import pytest

from conftest import METHODS, ROOT, load

SLUGS = sorted(p.stem for p in METHODS.glob("*.py"))
DOC_PARTS = ("arxiv", "official code", "reproduces", "run", "expected", "deviation")
COMMON_FIELDS = ("seed", "device", "compile", "bench", "out_dir", "preset")
ALLOWED_TOP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def contract_problems(src: str, slug: str, readme: str, test_exists: bool) -> list[str]:
    """Read a method file's source (never run it) and list every way it breaks the contract."""
    tree, problems = ast.parse(src), []
    doc = (ast.get_docstring(tree) or "").lower()
    problems += [f"docstring has no '{part}' part" for part in DOC_PARTS if part not in doc]
    for node in tree.body[1:]:
        is_main_guard = isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        if is_main_guard and ast.unparse(node.body[0]) != "shared.run(main, Args, PRESETS)":
            problems.append("the __main__ block must be exactly shared.run(main, Args, PRESETS)")
        is_import_fallback = isinstance(node, ast.Try) and all(  # `try: import shared except ImportError: ...`
            isinstance(n, (ast.Import, ast.ImportFrom)) or "sys.path" in ast.unparse(n)
            or (isinstance(n, ast.Assign) and ast.unparse(n.value) == "None")  # an optional package: `triton = None`
            for n in node.body + [s for h in node.handlers for s in h.body])
        if not (isinstance(node, ALLOWED_TOP) or is_main_guard or is_import_fallback):
            problems.append(f"line {node.lineno}: code runs at import ({type(node).__name__})")
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    problems += [f"no top-level {name}" for name in ("Args", "main") if name not in defs]
    problems += [f"no top-level {name}" for name in ("PRESETS", "SLUG") if name not in assigned]
    fields = set()
    if "Args" in defs:
        body = defs["Args"].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                fields.add(node.target.id)
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                    problems.append(f"Args.{node.target.id} has no docstring (it is the --help text)")
    problems += [f"Args has no '{f}' field" for f in COMMON_FIELDS if f not in fields]
    has_attention = "scaled_dot_product_attention" in src or "flex_attention" in src or any(
        "attention" in name.lower() for name in defs)
    if has_attention:
        problems += [f"has attention but no {n}" for n in ("attention_reference", "attention_fused") if n not in defs]
        problems += ["has attention but no ATTENTION dict"] if "ATTENTION" not in assigned else []
        problems += ["has attention but Args has no 'attn' field"] if "attn" not in fields else []
    if not test_exists:
        problems.append(f"no tests/test_{slug}.py")
    if f"methods/{slug}.py" not in readme:
        problems.append("no README row")
    return problems


@pytest.mark.parametrize("slug", SLUGS)
def test_method_keeps_the_contract(slug):
    src = (METHODS / f"{slug}.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert contract_problems(src, slug, readme, (ROOT / "tests" / f"test_{slug}.py").exists()) == []


@pytest.mark.parametrize("slug", SLUGS)
def test_presets_and_attention_paths(slug):
    module = load(slug)
    assert module.SLUG == slug
    assert {"smoke", "paper"} <= set(module.PRESETS)
    for name, preset in module.PRESETS.items():
        assert isinstance(preset, module.Args) and preset.preset == name, name
    defaults = module.Args()
    assert defaults.preset == "default" and defaults.device == "auto" and defaults.out_dir == "runs"
    if hasattr(module, "ATTENTION"):
        assert module.ATTENTION["reference"] is module.attention_reference
        assert module.ATTENTION["fused"] is module.attention_fused
        assert defaults.attn == "fused"
    assert all(f.type is not None for f in dataclasses.fields(module.Args))


def test_the_checker_catches_broken_files():
    broken = '"""A title\nReproduces: x. Run: y."""\nimport torch\nprint("hi")\n\nclass Args:\n    seed: int = 0\n\n' \
             'def attention_reference(q, k, v):\n    return q\n'
    problems = contract_problems(broken, "broken", readme="", test_exists=False)
    for expected in ("'expected' part", "code runs at import", "no top-level main", "no top-level PRESETS",
                     "Args.seed has no docstring", "no 'device' field", "no attention_fused", "no README row",
                     "no tests/test_broken.py"):
        assert any(expected in p for p in problems), (expected, problems)


def test_readme_lists_every_method_and_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt && ./run_all.sh" in readme
    assert "pip install -r requirements.txt && python -m pytest" in readme
    assert readme.count("| `methods/") >= 35  # one row per paper, planned or done
