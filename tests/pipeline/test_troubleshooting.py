"""The README's troubleshooting table is the error list, and the list matches real messages."""

from pathlib import Path

import pytest

from pipeline import troubleshooting

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_section_is_generated_from_the_error_list():
    readme = README.read_text()
    assert troubleshooting.with_section(readme) == readme, "run `make troubleshooting` after editing the list"


@pytest.mark.parametrize("line, documented", [
    ("error: model './x.gguf' not found: pass a hub id", True),
    ("error: calibration file 'a.txt' is not UTF-8 (byte 3): re-encode it as UTF-8", True),
    ("error: MODEL is a 4-bit GPTQ checkpoint but QUANT=w8a8: use QUANT=w4a16-gptq", True),
    ("memory: export is estimated to peak at 263.0 GB but 20.1 GB is available: run it elsewhere", True),
    ("error: something nobody wrote down", False),
    ("error: xx model 'a' not found", False),  # messages match from their start, not anywhere
])
def test_lines_are_found_by_how_they_start(line, documented):
    assert (troubleshooting.find(line) is not None) is documented
