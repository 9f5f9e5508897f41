"""clients.bench.task_memory: one row per asked type, the registry's bytes and form."""

from __future__ import annotations

import csv

import pytest

from clients.bench import task_memory


def test_task_memory_reports_each_type_with_its_form(tmp_path, capsys) -> None:
    assert (
        task_memory.main(
            [
                "--backbone",
                "bert-tiny",
                "--types",
                "lora,maskbert:density=0.001,maskbert:density=0.2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (run,) = tmp_path.iterdir()
    rows = list(csv.DictReader((run / "task_memory.csv").open()))
    assert [(r["task"], r["pet_type"], r["form"]) for r in rows] == [
        ("lora", "lora", ""),
        ("maskbert:density=0.001", "maskbert", "index"),  # a sparse mask: the index set
        ("maskbert:density=0.2", "maskbert", "bitmask"),  # a dense one: the bit mask
    ]
    size = [int(r["bytes"]) for r in rows]
    assert all(b > 0 for b in size) and size[1] < size[2]
    assert (run / "manifest.json").is_file()
    assert "maskbert as index" in capsys.readouterr().out


def test_task_memory_refuses_unknown_types_and_options() -> None:
    with pytest.raises(SystemExit, match="unknown PET type"):
        task_memory.parse_type("prefix_tuning")
    with pytest.raises(SystemExit, match="options are key=value"):
        task_memory.parse_type("maskbert:density")
    assert task_memory._split_types("lora,maskbert:density=0.01,seed=3,ia3") == [
        "lora",
        "maskbert:density=0.01,seed=3",
        "ia3",
    ]
