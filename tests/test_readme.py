"""The README's quickstart runs unchanged: it is extracted from the README, never copied."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_quickstart_runs(capsys):
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 2, "the README has two Python blocks: the quickstart and 'Did it help on my model?'"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 5 and printed[0].startswith("0 {")
    assert namespace["deployable"] is namespace["net"]


def test_readme_my_model_comparison_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/my-net here
    block = python_blocks(ROOT / "README.md")[1]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("deep-supervision: ") and printed[-1].split(": ")[-1] in (
        "helps", "hurts", "no detectable effect")
    results = namespace["results"]
    assert [v["name"] for v in results["variants"]] == ["baseline", "deep-supervision"]
    assert results["comparisons"][0]["seeds"] == [0, 1, 2]
    assert (tmp_path / "runs" / "my-net" / "report.html").exists()
