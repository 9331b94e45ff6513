"""The policy core and the simulator stay free of Kubernetes, kopf, torch and the data plane."""

from __future__ import annotations

import subprocess
import sys


def test_policy_and_simulator_import_nothing_heavy():
    code = (
        "import sys\n"
        "import stepfleet.operator.policy, stepfleet.operator.simulator.cli\n"
        "import stepfleet.operator.simulator.runner\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'kopf', 'kubernetes', 'torch', 'diffusers', 'fastapi'} "
        "or m.startswith('stepfleet.serving'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""


def test_policy_imports_no_third_party_package_at_all():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import stepfleet.operator.policy\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new - {'stepfleet'} - set(sys.stdlib_module_names))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
