"""docs/operations.md's cron recipe, followed end to end: the wrapper script it shows,
run twice at once and once more, files one batch."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import ACCESSCTL_BIN, Cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def cron_wrapper_script() -> str:
    text = DOC.read_text(encoding="utf-8")
    cron_section = text.split("## Cron", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", cron_section, flags=re.S)
    scripts = [b for b in blocks if "--key" in b and "accessctl" in b]
    assert scripts, "docs/operations.md's cron section lost its wrapper script"
    return str(scripts[0])


def test_cron_recipe_files_one_batch_however_often_it_runs(cli: Cli, tmp_path: Path) -> None:
    users = cli.add_users(3)
    env_file = tmp_path / "accessctl.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in cli.base_env().items() if k != "ACCESSCTL_LOG_FORMAT")
    )
    users_file = tmp_path / "nightly-users.txt"
    users_file.write_text("\n".join(users) + "\n")
    script = (
        cron_wrapper_script()
        .replace("/etc/accessctl/accessctl.env", str(env_file))
        .replace("/srv/accessctl/.venv/bin/accessctl", ACCESSCTL_BIN)
        .replace("/etc/accessctl/nightly-users.txt", str(users_file))
    )
    wrapper = tmp_path / "accessctl-nightly"
    wrapper.write_text(script)
    wrapper.chmod(0o755)

    runs = [
        subprocess.Popen([str(wrapper)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    again = subprocess.run([str(wrapper)], capture_output=True, text=True, timeout=120, check=False)
    summaries = []
    for code, (out, err) in [(r.returncode, o) for r, o in zip(runs, outputs, strict=True)] + [
        (again.returncode, (again.stdout, again.stderr))
    ]:
        assert code == 0, err
        summaries.append(json.loads(out))
    assert len({s["batch_id"] for s in summaries}) == 1
    assert summaries[0]["key"].startswith("nightly-")
    assert all((s["total"], s["recorded"]) == (3, 3) for s in summaries)
    assert cli.scalar("SELECT count(*) FROM batches") == 1
    assert cli.scalar("SELECT count(*) FROM accesses") == 3
