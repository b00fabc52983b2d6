"""Static check: nothing in the shipped code can unpickle (reliability.md #7).

An AST scan (not a regex: comments and docstrings may say "pickle") of every .py file in
the package, the processes, the examples and the benchmarks. It flags imports of pickle and
its relatives, ``recv_pyobj``/``send_pyobj``, ``allow_pickle=`` anything but a literal
False, ``torch.load`` without a literal ``weights_only=True`` (through any import alias),
and dynamic imports or exec'd strings that name pickle. Tests are not scanned: they build
pickle payloads on purpose to prove that the decoder rejects them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("idql_runtime", "learner", "actor", "examples", "benchmarks", "scripts")
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib",
                  "jsonpickle", "pickletools"}  # fmt: skip
BANNED_NAMES = {"recv_pyobj", "send_pyobj", "read_pickle", "to_pickle", "Unpickler"}
DYNAMIC_IMPORTERS = {"__import__", "importlib.import_module", "exec", "eval", "compile"}


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _qualname(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every way ``source`` could unpickle, as ``file:line: reason`` strings."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []

    def flag(node: ast.AST, reason: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {reason}")

    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in BANNED_MODULES:
                    flag(node, f"import {alias.name}")
                aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in BANNED_MODULES:
                flag(node, f"from {module} import ...")
            for alias in node.names:
                if alias.name in BANNED_MODULES or alias.name in BANNED_NAMES:
                    flag(node, f"from {module} import {alias.name}")
                aliases[alias.asname or alias.name] = f"{module}.{alias.name}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BANNED_NAMES:
            flag(node, f".{node.attr}")
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            flag(node, node.id)
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not _is_const(node.value, False):
                flag(node.value, "allow_pickle= not a literal False")
        elif isinstance(node, ast.Call):
            name = _qualname(node.func, aliases) or ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load" or name.endswith("torch.serialization.load"):
                if None in keywords:
                    flag(node, "torch.load(**kwargs): weights_only cannot be checked")
                elif not _is_const(keywords.get("weights_only"), True):
                    flag(node, "torch.load without weights_only=True")
            if name in DYNAMIC_IMPORTERS:
                for arg in ast.walk(node):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        words = set(arg.value.replace(".", " ").replace(";", " ").split())
                        if words & (BANNED_MODULES | BANNED_NAMES):
                            flag(node, f"{name}() with {arg.value!r}")
    return found


def shipped_python_files() -> list[Path]:
    files = []
    for directory in SCANNED_DIRS:
        if (ROOT / directory).is_dir():
            files += sorted((ROOT / directory).rglob("*.py"))
    return files


def test_shipped_code_cannot_unpickle():
    files = shipped_python_files()
    names = {f.name for f in files}
    assert {
        "protocol.py",
        "client.py",
        "raw_client.py",
        "actor_link.py",
        "learner_link.py",
    } <= names
    assert {"action_server.py", "security.py", "sockets.py"} <= names  # transport/
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


BAD = {
    "import": "import pickle\n",
    "import_alias": "import pickle as p\n",
    "import_submodule": "import dill.settings\n",
    "from_import": "from pickle import loads\n",
    "cpickle": "import _pickle\n",
    "cloudpickle": "from cloudpickle import dumps\n",
    "joblib": "import joblib\njoblib.load('x')\n",
    "shelve": "import shelve\n",
    "recv_pyobj": "def f(sock):\n    return sock.recv_pyobj()\n",
    "send_pyobj": "def f(sock, x):\n    sock.send_pyobj(x)\n",
    "np_allow_pickle": "import numpy as np\nnp.load('f.npy', allow_pickle=True)\n",
    "np_allow_pickle_var": "import numpy as np\nflag = 1\nnp.load('f', allow_pickle=flag)\n",
    "any_allow_pickle": "def g(load):\n    load('x', allow_pickle=True)\n",
    "torch_load": "import torch\ntorch.load('ckpt.pt')\n",
    "torch_load_false": "import torch\ntorch.load('ckpt.pt', weights_only=False)\n",
    "torch_load_alias": "import torch as th\nth.load('ckpt.pt', map_location='cpu')\n",
    "torch_load_from": "from torch import load\nload('ckpt.pt')\n",
    "torch_load_from_alias": "from torch import load as tl\ntl('ckpt.pt')\n",
    "torch_load_kwargs": "import torch\nkw = {}\ntorch.load('c', **kw)\n",
    "dunder_import": "m = __import__('pickle')\n",
    "importlib": "import importlib\nm = importlib.import_module('dill')\n",
    "exec": "exec('import pickle')\n",
    "pandas": "import pandas as pd\npd.read_pickle('x')\n",
}

GOOD = {
    "docstring": '"""We never use pickle; recv_pyobj is banned."""\n# import pickle\n',
    "np_load": "import numpy as np\nnp.load('f.npy')\nnp.load('f.npz', allow_pickle=False)\n",
    "torch_load_safe": "import torch\ntorch.load('ckpt.pt', weights_only=True, map_location='cpu')\n",
    "zmq_bytes": "def f(sock):\n    return sock.recv()\n",
    "msgpack": "import msgpack\nmsgpack.unpackb(b'', raw=False)\n",
    "other_load": "import json\njson.load(open('x'))\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_checker_detects_violation(name):
    assert violations(BAD[name]), f"{name!r} was not detected"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_checker_passes_clean_code(name):
    assert violations(GOOD[name]) == []


def test_checker_reports_file_and_line():
    found = violations("import os\n\nimport pickle\n", "pkg/mod.py")
    assert found == ["pkg/mod.py:3: import pickle"]
