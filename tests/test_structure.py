"""The package's shape: an import graph without cycles (imports at the top or inside a function), no function
longer than about 120 lines, and a training step that fits a screen."""

import ast
from pathlib import Path

import lowmem_alignprop

PACKAGE = Path(lowmem_alignprop.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source (function-level imports included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("lowmem_alignprop"):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "lowmem_alignprop.cli" in graph["lowmem_alignprop.__main__"]  # imported inside main()
    assert "lowmem_alignprop.rewards.base" in graph["lowmem_alignprop.rewards"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def _functions():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_is_longer_than_120_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > 120]
    assert not long, long


def test_the_training_step_fits_a_screen():
    (step,) = [node for path, node in _functions() if path.name == "train.py" and node.name == "train_step"]
    assert step.end_lineno - step.lineno + 1 <= 50


def test_the_frozen_weight_dtype_rule_is_written_once():
    """train, plan and sample ask precision.frozen_weight_dtype; nobody else maps mixed_precision to a dtype."""
    owners = {path.name for path in PACKAGE.rglob("*.py") if '"no": torch.float32' in path.read_text()
              or "[cfg.mixed_precision]" in path.read_text() or "[accelerator.mixed_precision]" in path.read_text()}
    assert owners == {"precision.py"}


def _checkpoint_rule_breakers(sources: dict[str, str]) -> list[str]:
    """Modules (path -> source) that checkpoint other than through memory/recompute.py: torch's checkpoint named, or
    diffusers' ``enable_gradient_checkpointing()`` left to its own (torch's) checkpoint."""
    bad = []
    for name, text in sources.items():
        if name == "memory/recompute.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.utils.checkpoint":
                bad.append(f"{name}: from torch.utils.checkpoint import")
            elif isinstance(node, ast.Attribute) and node.attr == "checkpoint" \
                    and ast.unparse(node.value) == "torch.utils.checkpoint":
                bad.append(f"{name}: torch.utils.checkpoint.checkpoint")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "enable_gradient_checkpointing" \
                    and not (node.args or node.keywords):
                bad.append(f"{name}: enable_gradient_checkpointing()")
    return bad


def test_every_checkpoint_goes_through_memory_recompute():
    """The planner's CUDA autocast emulation reaches a recompute only through memory/recompute.checkpoint (torch's
    public context_fn): a checkpoint made elsewhere would fail the plan of every fp16/bf16 GPU target."""
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}  # every __init__.py
    assert "memory/recompute.py" in sources and not _checkpoint_rule_breakers(sources)
    assert len(_checkpoint_rule_breakers({
        "a.py": "from torch.utils.checkpoint import checkpoint",
        "b.py": "y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)",
        "c.py": "vae.enable_gradient_checkpointing()"})) == 3


# The folders are the layers, bottom first; a module imports only from its own layer or the ones below it.
LAYERS = ["settings", "memory", "run", "models", "toy", "rewards", "step", "measure", "lora", "training", "commands",
          "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__", "cli"):
        return LAYERS.index("cli")  # the package root: the command line
    return LAYERS.index(parts[1])


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "cli.py")]
    assert not loose, f"put {loose} in one of the layer folders {LAYERS[:-1]}"
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(LAYERS[:-1])


def test_imports_point_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    assert _layer("lowmem_alignprop.settings.config") < _layer("lowmem_alignprop.training.train")
    assert _layer("lowmem_alignprop.__main__") == _layer("lowmem_alignprop") == len(LAYERS) - 1


def test_every_text_file_is_read_and_written_as_utf8():
    """open()/read_text()/write_text() without an encoding use the locale's on Windows (cp1252): a prompt, path or
    model card with non-ASCII text came back garbled or raised. Every text-mode call in the package names one
    (run/atomic.write_text is UTF-8 by default)."""
    missing = []
    for path, tree in ((p, ast.parse(p.read_text(encoding="utf-8"))) for p in PACKAGE.rglob("*.py")):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, keywords = node.func, {k.arg for k in node.keywords}
            if "encoding" in keywords:
                continue
            if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text") \
                    and not (isinstance(func.value, ast.Name) and func.value.id == "atomic"):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)[:60]}")
            elif isinstance(func, ast.Name) and func.id == "open":
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), ast.Constant("r"))
                modes = [mode.body, mode.orelse] if isinstance(mode, ast.IfExp) else [mode]
                if not all(isinstance(m, ast.Constant) and "b" in str(m.value) for m in modes):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)[:60]}")
    assert not missing, missing
