"""The shape of the house (docs/architecture.md), read from the imports of the source tree itself: packages sit
in layers and import only downwards, no two modules import each other (directly or round a loop), and the top
of sslscale/ holds only the command line, the package's face and the one measure shared by training and
evaluation. Imports inside functions count as much as those at the top of a file."""
import ast
import os

import pytest

from tests.conftest import REPO

# Bottom first. A module may import from its own package and from any lower layer; packages on one layer are
# siblings and import nothing of each other.
LAYERS = [
    ("sslscale",),                              # the package's face: its version, importing nothing
    ("data_pipelines",),                        # files on disk -> crops; nothing of sslscale
    ("sslscale.models", "sslscale.metrics"),    # networks; label-free measures (RankMe)
    ("sslscale.config",),                       # the run's configuration (validates head names against models)
    ("sslscale.dist",),                         # ranks, process groups, collectives, DDP / FSDP
    ("sslscale.objectives",),                   # the losses with their heads; the trained model
    ("sslscale.optim",),                        # optimizers and the lr schedule
    ("sslscale.checkpoint", "sslscale.cost"),   # what is on disk; what a run will cost
    ("sslscale.train",),                        # the loop and what runs around it
    ("sslscale.eval",),                         # probes of frozen trunks
    ("sslscale.cli",),                          # the command line
    ("launch",),                                # SLURM and local jobs
]
TOP_LEVEL_MODULES = {"__init__.py", "cli.py", "metrics.py"}


def module_name(path: str) -> str:
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def source_modules() -> dict[str, str]:
    modules = {}
    for top in ("sslscale", "data_pipelines", "launch"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(folder, file)
                    modules[module_name(path)] = path
    return modules


MODULES = source_modules()


def imports_of(path: str) -> set[str]:
    """Project modules that `path` imports, anywhere in the file; `from pkg import sub` names the submodule."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer_of(module: str) -> tuple[int, str]:
    """(layer, package) of the longest package prefix in LAYERS."""
    best = None
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (best is None or
                                                                           len(package) > len(best[1])):
                best = (index, package)
    assert best is not None, f"{module} belongs to no layer of LAYERS"
    return best


def test_every_package_of_the_layers_is_there():
    """A folder the version control ignores (a `dist/` or `data/` rule) would be missing from a fresh clone."""
    missing = [package for packages in LAYERS for package in packages if package not in MODULES]
    assert not missing, f"packages named in LAYERS but absent from the tree: {missing}"


def test_every_import_points_down_or_stays_in_its_package():
    upward = []
    for module, imported in GRAPH.items():
        layer, package = layer_of(module)
        for target in imported:
            target_layer, target_package = layer_of(target)
            if target_package == package:
                continue
            if target_layer >= layer:
                upward.append(f"{module} -> {target} ({package} is on layer {layer}, {target_package} on "
                              f"{target_layer})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_round_a_loop():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_top_of_sslscale_holds_only_the_cli_the_face_and_the_shared_measure():
    top = {f for f in os.listdir(os.path.join(REPO, "sslscale")) if f.endswith(".py")}
    assert top == TOP_LEVEL_MODULES


@pytest.mark.parametrize("planted", ["sslscale.config.tree -> sslscale.train.loop",
                                     "sslscale.checkpoint.store -> sslscale.cost.plan"])
def test_the_layer_check_catches_a_planted_upward_or_sideways_import(planted):
    module, target = planted.split(" -> ")
    layer, package = layer_of(module)
    target_layer, target_package = layer_of(target)
    assert target_package != package and target_layer >= layer
