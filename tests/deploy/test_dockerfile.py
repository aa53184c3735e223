"""docker/Dockerfile passes hadolint and the image contract; a deliberately bad one fails both."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.dockerfile import DOCKERFILE, check_dockerfile, contract_problems, parse
from tests.deploy.manifests import CHART
from tests.deploy.tools import Tools

BAD = Path(__file__).resolve().parent / "broken" / "Dockerfile.root-latest"


def test_dockerfile_lints_clean_and_keeps_the_contract(deploy_tools: Tools) -> None:
    assert [str(p) for p in check_dockerfile(deploy_tools)] == []


def test_bad_dockerfile_is_rejected(deploy_tools: Tools) -> None:
    problems = check_dockerfile(deploy_tools, BAD)
    hadolint = " ".join(p.message for p in problems if p.stage == "hadolint")
    for rule in ("DL3007", "DL3009", "DL3013", "DL3015", "DL3042", "DL3049"):
        assert rule in hadolint
    contract = [p.message for p in problems if p.stage == "contract"]
    assert "FlashAttention must be built in a separate builder stage (one FROM found)" in contract
    assert "the final stage must switch to a non-root USER" in contract
    assert "the image needs a HEALTHCHECK on Triton's /v2/health endpoint" in contract
    assert "the default flags lack --exit-timeout-secs" in contract
    assert any("not pinned to an exact tag" in m for m in contract)
    assert any("weights must be mounted, never copied into the image" in m for m in contract)


def test_parse_joins_continuations_and_skips_comments() -> None:
    text = "FROM a:1 AS b\n# note\nRUN one \\\n    # inside\n    && two\nUSER 5\n"
    assert [(i.line, i.keyword, i.arguments) for i in parse(text)] == [
        (1, "FROM", "a:1 AS b"),
        (3, "RUN", "one && two"),
        (6, "USER", "5"),
    ]


def test_image_defaults_must_agree_with_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = DOCKERFILE.read_text()
    assert contract_problems(text, values) == []
    drifted = text.replace('"--exit-timeout-secs=1800"', '"--exit-timeout-secs=900"').replace(
        "USER 10001", "USER 1000"
    )
    assert [p.message for p in contract_problems(drifted, values)] == [
        "--exit-timeout-secs differs from the chart's server.exitTimeoutSeconds",
        "USER 1000 differs from the chart's podSecurityContext.runAsUser",
    ]
