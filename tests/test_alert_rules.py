"""deploy/prometheus checked by Prometheus' own tool: the rules and the scrape config load,
and every alert fires on the condition it documents and stays silent otherwise
(``promtool test rules deploy/prometheus/alerts_test.yml``).

A PromQL expression can parse and name only real series yet never fire (a binary operator
whose sides keep different labels matches nothing): only evaluating it shows that. Needs
``promtool`` on PATH (Debian package ``prometheus``; .ci/run installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")

FOLDER = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (package prometheus)")


def _promtool(*args: str, cwd: Path = FOLDER) -> str:
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out


def test_alert_rules_load() -> None:
    _promtool("check", "rules", "alerts.yml")


def test_every_alert_fires_on_its_condition_only() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load((FOLDER / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    rules = yaml.safe_load((FOLDER / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for g in rules for r in g["rules"] if "alert" in r}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"
    _promtool("test", "rules", "alerts_test.yml")


def test_scrape_config_loads(tmp_path: Path) -> None:
    # The config names the rules by their path in the container: point it at the repo's file.
    conf = yaml.safe_load((FOLDER / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["/etc/prometheus/alerts.yml"]
    conf["rule_files"] = [str(FOLDER / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
