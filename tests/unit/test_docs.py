"""The documents that mirror code or command output stay in step with it."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lidit.train.config import DataConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "checkpoints" / "MODEL_CARD.md"]


def config_table_fields(markdown: str) -> set[str]:
    """The backticked names in the first column of the table under '## Config fields'."""
    section = markdown.split("## Config fields", 1)[1]
    rows = [line for line in section.splitlines()[1:] if line.startswith("|")]
    names: set[str] = set()
    for row in rows[2:]:  # header and rule
        names |= set(re.findall(r"`([^`]+)`", row.split("|")[1]))
    return names


def test_the_training_docs_list_every_config_field_and_no_other():
    documented = config_table_fields((ROOT / "docs" / "training.md").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fields |= {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    assert documented == fields, (f"undocumented: {sorted(fields - documented)}; "
                                  f"documented but not a field: {sorted(documented - fields)}")


def test_the_study_doc_holds_the_study_commands_table_unedited():
    table = (ROOT / "docs" / "study" / "table.md").read_text()
    study = (ROOT / "docs" / "study.md").read_text()
    start = "<!-- study table: the output of python -m lidit study, unedited -->\n"
    block = study.split(start, 1)[1].split("<!-- end of study table -->", 1)[0]
    assert block.strip() == table.strip()


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken


def test_the_readme_is_for_users_and_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
