"""A real Jupyter kernel runs a real notebook against a real ``procsched serve``.

Given a running service, and a notebook whose first cell holds its address;
when a fresh IPython kernel (this interpreter, through a kernelspec written
for the test) runs the notebook top to bottom; then functions, a helper and
a class defined in cells travel by value to the service's workers, results
come back as instances of the notebook's own class, ``map`` shows a
progress bar only when asked, a lambda runs, and an exception class defined
in a cell reaches the cell as that class.

The cells assert on their own results (a failing ``assert`` fails the
run); this module checks what only the outputs show: the progress bar,
and the error a cell ends with.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from servicectl import Service

#: the progress bar tqdm shows in a notebook when ipywidgets is installed (else a text bar on stderr)
WIDGET = "application/vnd.jupyter.widget-view+json"

SETUP = """\
import os
import procsched
ADDRESS = {address!r}
client = procsched.connect(ADDRESS)
"""

DEFINITIONS = """\
class Result:
    def __init__(self, seed, value, pid):
        self.seed, self.value, self.pid = seed, value, pid

def walk(seed, steps):
    x = seed
    for _ in range(steps):
        x = (x * 1103515245 + 12345) % 2**31
    return x

def simulate(seed):
    return Result(seed, walk(seed, 500), os.getpid())
"""

SUBMIT = """\
futs = [client.submit(simulate, s) for s in range(200)]
results = [f.result(timeout=30) for f in futs]
assert all(type(r) is Result for r in results), {type(r) for r in results}
assert [r.value for r in results] == [walk(s, 500) for s in range(200)]
assert os.getpid() not in {r.pid for r in results}, "the jobs ran in the kernel, not in the service"
"""

MAP_WITH_BAR = """\
values = list(client.map(simulate, range(500), progress=True))
assert [r.value for r in values] == [walk(s, 500) for s in range(500)]
"""

MAP_WITHOUT_BAR = """\
values = list(client.map(simulate, range(500), progress=False))
assert [(r.seed, r.value) for r in values] == [(s, walk(s, 500)) for s in range(500)]
"""

LAMBDAS = """\
offset = 7
assert client.submit(lambda x: x * 3 + 1, 14).result(timeout=30) == 43
assert list(client.map(lambda x: x + offset, range(5), progress=False)) == [7, 8, 9, 10, 11]
"""

FAILING = """\
class SimulationError(Exception):
    pass

def unstable(seed):
    if seed % 2:
        raise SimulationError(f"seed {seed} diverged")
    raise ValueError(f"seed {seed} is even")

err = client.submit(unstable, 4).exception(timeout=30)
assert type(err) is ValueError and str(err) == "seed 4 is even", repr(err)
try:
    client.submit(unstable, 5).result(timeout=30)
except SimulationError as e:
    assert str(e) == "seed 5 diverged"
else:
    raise AssertionError("no SimulationError")
"""

# tagged "raises-exception": nbclient records the error and goes on
UNCAUGHT = "client.submit(unstable, 3).result(timeout=30)"

CLOSE = """\
client.close()
print("closed")
"""


def python_kernel(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``python3`` this interpreter's IPython kernel, whatever kernelspecs the machine has.

    ``JUPYTER_PATH`` is searched before the user's and the environment's own
    directories; the runtime and IPython directories go under ``root`` so the
    test leaves nothing in the home directory and reads no user profile.
    """
    spec = root / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(root / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(root / "ipython"))
    monkeypatch.delenv("PROCSCHED_ADDRESS", raising=False)


def bar_outputs(cell: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The outputs of ``cell`` that are a progress bar: tqdm's widget, or its text on stderr."""
    found = []
    for out in cell.outputs:
        if WIDGET in out.get("data", {}):
            found.append(out)
        elif out.output_type == "stream" and out.name == "stderr" and "job/s" in out.text:
            found.append(out)
    return found


def progress_widgets(nb: nbformat.NotebookNode) -> list[tuple[float, float]]:
    """(value, max) of each progress widget, in the widget state nbclient stores when the run ends."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return [(m["state"]["value"], m["state"]["max"]) for m in state.values() if m["model_name"] == "FloatProgressModel"]


@pytest.mark.timeout(120)
def test_notebook_runs_against_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python_kernel(tmp_path, monkeypatch)
    with Service(tmp_path) as service:
        uncaught = new_code_cell(UNCAUGHT, metadata={"tags": ["raises-exception"]})
        cells = [SETUP.format(address=service.address), DEFINITIONS, SUBMIT, MAP_WITH_BAR, MAP_WITHOUT_BAR, LAMBDAS, FAILING]
        nb = new_notebook(cells=[*map(new_code_cell, cells), uncaught, new_code_cell(CLOSE)])
        NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    by_source = {cell.source: cell for cell in nb.cells}
    with_bar, without_bar = by_source[MAP_WITH_BAR], by_source[MAP_WITHOUT_BAR]
    bars = bar_outputs(with_bar)
    assert bars, f"map(progress=True) showed no progress bar: {with_bar.outputs}"
    if importlib.util.find_spec("ipywidgets") is not None:  # the kernel runs this interpreter
        assert any(WIDGET in out.get("data", {}) for out in bars), f"tqdm fell back to text: {with_bar.outputs}"
        assert (500.0, 500.0) in progress_widgets(nb), "the bar never reached 500/500"
    assert without_bar.outputs == [], f"map(progress=False) printed: {without_bar.outputs}"

    errors = [out for out in by_source[UNCAUGHT].outputs if out.output_type == "error"]
    assert [(e.ename, e.evalue) for e in errors] == [("SimulationError", "seed 3 diverged")]
    traceback = "\n".join(errors[0].traceback)
    assert "RemoteTraceback" in traceback and "in unstable" in traceback, f"no remote traceback: {traceback}"
    assert by_source[CLOSE].outputs[0].text == "closed\n"
