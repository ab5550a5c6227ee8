"""Static checks of the Slicer module (qt cannot be imported here, so Python is read with ast):
.ui parses, widget and parameter names agree, CMake lists every imported file, extension
metadata and sample-data checksums are consistent."""

import ast
import hashlib
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRISynthesis"
MODULE_PY = MODULE_DIR / "MRISynthesis.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MRISynthesis.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
HELPER_PACKAGE = "SlicerMRISynthesisLib"
HELPER_DIR = MODULE_DIR / HELPER_PACKAGE
# Parameter-node fields the widget binds itself (shown with human labels / internal state).
WIDGET_BOUND_FIELDS = {"model", "device", "brainMask", "decidedInputs"}


def module_tree(path=MODULE_PY):
    return ast.parse(path.read_text(), filename=str(path))


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_parameter_bindings():
    bindings = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[name] = prop.find("string").text
    return bindings


def parameter_node_fields():
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in MRISynthesis.py")


def test_ui_parses_and_is_a_qmrmlwidget():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MRISynthesis"
    # Every node selector gets the scene from the top widget.
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors == receivers == {"t1Selector", "t2Selector", "t1cSelector", "maskSelector", "outputSelector",
                                       "maskOutputSelector"}


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert {"applyButton", "progressBar", "statusLabel"} <= used  # the check sees real uses
    missing = used - set(ui_widgets())
    assert not missing, f"MRISynthesis.py uses self.ui.{sorted(missing)} which the .ui does not define"


def test_ui_bindings_and_parameter_node_fields_agree():
    bindings = ui_parameter_bindings()
    fields = parameter_node_fields()
    unknown = set(bindings.values()) - fields
    assert not unknown, f".ui binds SlicerParameterName {sorted(unknown)} missing from the parameter node"
    unbound = fields - set(bindings.values()) - WIDGET_BOUND_FIELDS
    assert not unbound, f"parameter node fields {sorted(unbound)} have no widget in the .ui"
    assert len(set(bindings.values())) == len(bindings), "two widgets bind the same parameter"
    assert bindings["t1Selector"] == "t1Volume" and bindings["modelFilePathLineEdit"] == "modelFile"
    assert not (WIDGET_BOUND_FIELDS & set(bindings.values())), "the widget binds model/device itself"
    source = MODULE_PY.read_text()
    assert "parameterNode.model = " in source and "parameterNode.device = " in source
    assert "parameterNode.brainMask = " in source


def _imports(path):
    """Top-level and nested module names imported by a Python file (relative ones resolved
    inside the file's own package)."""
    package = path.parent.name
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package + ("." + node.module if node.module else "")
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _needed_files():
    """Paths of every local file the module and the batch script need, following imports
    transitively through SlicerMRISynthesisLib and MRISynthesisLib."""
    roots = {HELPER_PACKAGE: HELPER_DIR, "MRISynthesisLib": REPO / "MRISynthesisLib"}
    todo = [MODULE_PY, MODULE_DIR / "Scripts" / "batch_synthesize.py"]
    seen, needed = set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] not in roots:
                continue
            candidate = roots[parts[0]] / (f"{parts[1]}.py" if len(parts) > 1 else "__init__.py")
            if not candidate.exists():
                continue  # "from package.module import name": name is not a module
            for item in (roots[parts[0]] / "__init__.py", candidate):
                needed.add(item)
                todo.append(item)
    return needed


def installed_python_files():
    """Every .py the extension installs into Slicer: the module's scripts (CMake list) and
    the MRISynthesisLib files CMake copies beside them."""
    cmake = re.sub(r"#.*", "", MODULE_CMAKE.read_text()).replace("${MODULE_NAME}", "MRISynthesis")
    files = []
    for item in re.findall(r"[\w{}$/]+\.py", cmake):
        files.append((REPO if item.startswith("MRISynthesisLib/") else MODULE_DIR) / item)
    return files


def test_cmake_lists_every_file_the_module_imports():
    cmake = re.sub(r"#.*", "", MODULE_CMAKE.read_text())  # comments are not listings
    listed = set(re.findall(r"[\w{}$/]+\.(?:py|png|ui)", cmake))
    listed = {item.replace("${MODULE_NAME}", "MRISynthesis") for item in listed}
    needed = _needed_files()
    assert REPO / "MRISynthesisLib" / "inference.py" in needed  # the walk follows imports
    assert HELPER_DIR / "jobs.py" in needed and HELPER_DIR / "modelinfo.py" in needed
    for path in needed:
        relative = (path.relative_to(MODULE_DIR) if MODULE_DIR in path.parents
                    else path.relative_to(REPO)).as_posix()
        assert relative in listed, f"{relative} is imported by the module but not listed in {MODULE_CMAKE}"
    assert "MRISynthesis.py" in listed and "Scripts/batch_synthesize.py" in listed
    for item in listed:  # and everything listed exists
        base = REPO if item.startswith("MRISynthesisLib/") else MODULE_DIR
        assert (base / item).is_file(), f"{MODULE_CMAKE} lists {item}, which does not exist"
    assert "WITH_GENERIC_TESTS" in cmake and "slicerMacroBuildScriptedModule" in cmake


def test_module_file_never_imports_torch_at_import_time():
    tree = module_tree()
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top_level.add(node.module)
    assert "torch" not in top_level
    heavy = {"MRISynthesisLib.inference", "MRISynthesisLib.bundle", "MRISynthesisLib.networks",
             "MRISynthesisLib.preprocessing"}
    assert not (top_level & heavy), f"MRISynthesis.py imports {top_level & heavy} at import time (they import torch)"
    # What it imports at top level, and listing the models with their cards, is torch-free
    # (a fresh interpreter with only the module folder on sys.path, as Slicer has it).
    local = sorted(m for m in top_level if m.split(".")[0] in (HELPER_PACKAGE, "MRISynthesisLib"))
    assert f"{HELPER_PACKAGE}.jobs" in local
    code = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r})\n"
            + "".join(f"import {m}\n" for m in local)
            + "from SlicerMRISynthesisLib import modelinfo; assert len(modelinfo.shippedModels()) == 4\n"
            + "print('torch' in sys.modules)")
    result = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(MODULE_DIR.parent / "Testing"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _module_classes(path):
    """Names of the classes in a file that derive from ScriptedLoadableModule itself."""
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)
            and any(getattr(b, "id", getattr(b, "attr", None)) == "ScriptedLoadableModule" for b in node.bases)}


def test_every_top_level_python_file_is_a_module():
    """Slicer registers each top-level *.py of a scripted-module folder as a module and fails
    with "class X was not found in file X.py" for any without a same-named module class."""
    top_level = set(MODULE_DIR.glob("*.py"))
    top_level |= {p for p in installed_python_files() if p.parent == MODULE_DIR}
    assert MODULE_PY in top_level
    for path in sorted(top_level):
        assert path.stem in _module_classes(path), (
            f"{path.name} sits in the scripted-module folder but has no class {path.stem}(ScriptedLoadableModule): "
            f"Slicer would fail to load it; move it into {HELPER_PACKAGE}/")
    # The check can fail: a helper file at the top level has no module class.
    assert "SynthesisSceneLogic" not in _module_classes(HELPER_DIR / "scene.py")
    assert _module_classes(HELPER_DIR / "scene.py") == set()
    # Everything in the helper package is installed.
    installed = set(installed_python_files())
    assert set(HELPER_DIR.glob("*.py")) <= installed, "CMakeLists.txt must list every file of the helper package"


def test_everything_installed_into_slicer_parses_as_python_3_9():
    """Slicer 5.8 ships Python 3.9: no match statements, no X | Y annotations evaluated at
    run time, no parenthesised context managers..."""
    files = installed_python_files()
    assert MODULE_PY in files and REPO / "MRISynthesisLib" / "inference.py" in files
    assert MODULE_DIR / "Scripts" / "batch_synthesize.py" in files
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    with pytest.raises(SyntaxError):  # the check can fail
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


def test_runtime_annotations_are_python_3_9_safe():
    """ast cannot see ``X | None`` in an annotation that is evaluated at import (a dataclass
    or function without ``from __future__ import annotations``); on 3.9 it raises TypeError."""
    for path in installed_python_files():
        tree = ast.parse(path.read_text())
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                     and any(a.name == "annotations" for a in n.names) for n in tree.body)
        if future:
            continue
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, ast.AnnAssign):
                annotations.append(node.annotation)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
                if node.returns:
                    annotations.append(node.returns)
            for annotation in annotations:
                bad = [n for n in ast.walk(annotation) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)]
                assert not bad, f"{path}:{annotation.lineno}: 'X | Y' annotation is evaluated at import on Python 3.9"


def test_extension_metadata_and_catalog_entry():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", cmake), f"top-level CMakeLists.txt lacks {key}"
    assert "add_subdirectory(MRISynthesis)" in cmake
    catalog = json.loads((REPO / "MRISynthesis.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(catalog)
    assert catalog["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1)
    assert catalog["category"] == "Image Synthesis"  # as SlicerModalityConverter
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', cmake) and catalog["build_dependencies"] == ["PyTorch"]
    from PIL import Image

    for icon in (REPO / "Resources/Icons/MRISynthesis.png", MODULE_DIR / "Resources/Icons/MRISynthesis.png"):
        assert Image.open(icon).size == (128, 128)


def test_catalog_readiness_license_and_urls():
    """The catalog checker needs a top-level LICENSE; every URL into this repository that the
    metadata names must point at a file that exists."""
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    pyproject = (REPO / "pyproject.toml").read_text()  # the SPDX form: the table form is deprecated
    assert re.search(r'^license = "Apache-2\.0"\nlicense-files = \["LICENSE"\]$', pyproject, re.M)
    texts = [(REPO / "CMakeLists.txt").read_text(), (REPO / "MRISynthesis.json").read_text()]
    urls = [u for text in texts for u in re.findall(r"https://raw\.githubusercontent\.com/[^\s\"';]+", text)]
    ours = [u for u in urls if "/MRISynthesis/SlicerMRISynthesis/" in u]
    assert set(urls) - set(ours) <= {"https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                     "slicer-extension-catalog-entry-schema-v1.0.1.json#"}
    assert len(ours) >= 2  # icon and screenshot
    for url in ours:
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/MRISynthesis/SlicerMRISynthesis/main/(.+)", url)
        assert match, f"{url} does not point into this repository's main branch"
        assert (REPO / match.group(1)).is_file(), f"{url} names {match.group(1)}, which does not exist"
    from PIL import Image

    assert Image.open(REPO / "Resources/Screenshots/MRISynthesis.png").size[0] >= 800


def test_panel_shows_the_research_notice():
    label = ui_widgets()["researchNoticeLabel"]
    text = next(p.find("string").text for p in label.findall("property") if p.get("name") == "text")
    assert "research use only" in text.lower()
    assert {"modelInfoLabel", "environmentLabel"} <= set(ui_widgets())


def _sample_files():
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SAMPLE_FILES":
            return ast.literal_eval(node.value)
    raise AssertionError("SAMPLE_FILES not found")


def test_sample_data_is_pinned_and_checksummed():
    files = _sample_files()
    names = [f for _, f, _ in files]
    assert [n.rsplit("-", 1)[1] for n in names] == ["t1n.nii.gz", "t2w.nii.gz", "t1c.nii.gz", "t2f.nii.gz"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", sha) for _, _, sha in files)
    source = MODULE_PY.read_text()
    assert re.search(r'SAMPLE_COMMIT = "[0-9a-f]{40}"', source)
    assert "raw.githubusercontent.com/BrainLesion/tutorials/" in source


def test_sample_checksums_match_the_upstream_files_when_available():
    """The SHA-256 sums are of files byte-identical to the upstream blobs (git blob ids in the
    data folder's provenance.json); verified against the local copies when present."""
    data = os.environ.get("MRISYNTHESIS_DATA")
    if not data or not (Path(data) / "provenance.json").is_file():
        pytest.skip("real data not available: set MRISYNTHESIS_DATA to check sample checksums")
    provenance = json.loads((Path(data) / "provenance.json").read_text())
    by_path = {Path(p["path"]).name: p for p in provenance}
    source = MODULE_PY.read_text()
    commit = re.search(r'SAMPLE_COMMIT = "([0-9a-f]{40})"', source).group(1)
    for _, name, sha in _sample_files():
        entry = by_path[name]
        assert entry["repo"] == "BrainLesion/tutorials" and entry["commit"] == commit
        assert entry["path"].endswith(f"BraTS-GLI-00001-000/{name}")
        content = (Path(data) / entry["folder"] / entry["file"]).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        assert blob == entry["blob"], f"local copy of {name} differs from the upstream blob"
        assert hashlib.sha256(content).hexdigest() == sha


# ----------------------------------------------------------------------------- issue 18 items 3 and 7


def _imports_torch(tree):
    """Statements in ``tree`` that import torch (import torch, from torch..., importlib.import_module("torch"),
    __import__("torch"))."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            found.append(node)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).split(".")[0] == "torch"):
            found.append(node)
    return found


# The panel's helpers; scene.py holds the in-process synthesis of the console API and the
# batch script (which import torch by design) and jobs.py drives the worker process.
PANEL_HELPERS = ("__init__.py", "dependencies.py", "modelinfo.py")


def test_the_panel_never_imports_torch_into_slicer():
    """Issue 18 item 3: enter() imported torch to show its version, so an old torch left by
    another extension was loaded and could then not be upgraded until a restart. Only the
    self-test (which runs when torch is installed and new enough) may import it in Slicer."""
    tree = module_tree()
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name == "MRISynthesisTest":
            tree.body.remove(cls)
            break
    else:
        raise AssertionError("MRISynthesisTest not found")
    found = [f"MRISynthesis.py:{n.lineno}" for n in _imports_torch(tree)]
    for name in PANEL_HELPERS:
        found += [f"{HELPER_PACKAGE}/{name}:{n.lineno}" for n in _imports_torch(ast.parse((HELPER_DIR / name).read_text()))]
    found += [f"MRISynthesisLib/processes.py:{n.lineno}" for n in
              _imports_torch(ast.parse((REPO / "MRISynthesisLib" / "processes.py").read_text()))]
    assert not found, f"torch imported into Slicer's process by the panel at {found}"
    assert _imports_torch(ast.parse("def f():\n    import torch as t\n"))  # the check can fail
    assert _imports_torch(ast.parse("importlib.import_module('torch.cuda')"))


def test_sample_data_uses_loadFileTypes():
    """Issue 18 item 7: ``loadFileType`` is the deprecated alias (SampleData.py, Slicer 5.8-5.12)."""
    registered = next(n for n in module_tree().body if isinstance(n, ast.FunctionDef) and n.name == "registerSampleData")
    call = next(n for n in ast.walk(registered) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", None) == "registerCustomSampleDataSource")
    keywords = {k.arg for k in call.keywords}
    # SampleDataLogic.registerCustomSampleDataSource's parameters in Slicer 5.8.1 and 5.12.0.
    signature = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
                 "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}
    assert keywords <= signature and "loadFileTypes" in keywords and "loadFileType" not in keywords


NAME_AFFILIATION = re.compile(r"[^(),]+ \([^()]+\)")


def test_contributors_are_name_affiliation():
    """Slicer lists contributors as "Name (Affiliation)" (the module template, the extension
    catalog): in the module class and in EXTENSION_CONTRIBUTORS."""
    module = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MRISynthesis")
    assignment = next(n for n in ast.walk(module) if isinstance(n, ast.Assign)
                      and ast.unparse(n.targets[0]) == "self.parent.contributors")
    contributors = ast.literal_eval(assignment.value)
    cmake = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert contributors and all(NAME_AFFILIATION.fullmatch(c) for c in contributors), contributors
    assert all(NAME_AFFILIATION.fullmatch(c.strip()) for c in cmake.split(", ")), cmake
    assert set(contributors) == {c.strip() for c in cmake.split(", ")}
    assert not NAME_AFFILIATION.fullmatch("MRISynthesis contributors")  # the check can fail


def node_combo_items(widget):
    """The entries a qMRMLNodeComboBox shows besides the nodes, by the rules of
    qMRMLNodeComboBoxPrivate::updateNoneItem/updateActionItems (Slicer 5.8-5.12): the None item
    (noneDisplay) when noneEnabled; "Create new <type label>" when addEnabled (the default: on),
    plus "Create new <label> as..." with renameEnabled; "Rename current <label>" with renameEnabled."""
    props = {}
    for prop in widget.findall("property"):
        value = prop[0]
        props[prop.get("name")] = [s.text for s in value] if value.tag == "stringlist" else value.text
    enabled = {k: props.get(k, default) == "true" for k, default in
               (("noneEnabled", "false"), ("addEnabled", "true"), ("renameEnabled", "false"))}
    labels = {"vtkMRMLScalarVolumeNode": "Volume", "vtkMRMLLabelMapVolumeNode": "LabelMapVolume"}
    items = []
    if enabled["noneEnabled"]:
        items.append(props.get("noneDisplay", "None"))
    for nodeType in props.get("nodeTypes", []):
        label = labels.get(nodeType, nodeType)
        if enabled["renameEnabled"]:
            items.append(f"Rename current {label}")
        if enabled["addEnabled"]:
            items.append(f"Create new {label}")
            if enabled["renameEnabled"]:
                items.append(f"Create new {label} as...")
    return items


def test_every_selector_offers_at_most_one_create_new_entry():
    """Issue 18 item 7: the output selector showed "Create new volume" (its None item: each
    Apply makes a new volume) and "Create new Volume" / "... as..." (addEnabled: an empty node
    that the next Apply overwrites). Only the None item stays."""
    selectors = {n: w for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    for name, widget in selectors.items():
        creating = [item for item in node_combo_items(widget) if item.lower().startswith("create new")]
        assert len(creating) <= 1, f"{name} offers {creating}"
    assert [i for i in node_combo_items(selectors["outputSelector"]) if i.startswith("Create")] == ["Create new volume"]
    assert [i for i in node_combo_items(selectors["maskOutputSelector"])
            if i.startswith("Create")] == ["Create new label map"]
    import copy

    doubled = copy.deepcopy(selectors["outputSelector"])  # the check can fail
    for prop in doubled.findall("property"):
        if prop.get("name") == "addEnabled":
            prop[0].text = "true"
    assert len([i for i in node_combo_items(doubled) if i.startswith("Create new")]) == 3
