"""tools/support_matrix.py: recorded test outcomes -> the markdown matrix, docs/support-matrix.md and
README's marked block. (The recording itself is tests/conftest.py's, run by the tool on the family tests.)"""
import pytest

from tools import support_matrix

CELLS = {("llama", "parity"): {"cell": "yes"}, ("llama", "sliding window"): {"cell": "n/a"},
         ("phi3", "parity"): {"cell": "fails"}, ("phi3", "PEFT export"): {"cell": "refused (not in PEFT)"}}


def test_render_puts_each_recorded_cell_in_its_row_and_column():
    matrix = support_matrix.render(CELLS)
    header = "| family | " + " | ".join(support_matrix.FEATURES) + " |"
    assert header in matrix
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in matrix.splitlines()
            if line.startswith("| ") and not line.startswith("| family")}
    assert list(rows) == ["Llama", "Phi3"]  # in causalattn.hf.families' order
    columns = list(support_matrix.FEATURES)
    assert rows["Llama"][columns.index("parity")] == "yes" and rows["Llama"][columns.index("sliding window")] == "n/a"
    assert rows["Phi3"][columns.index("parity")] == "fails"
    assert rows["Phi3"][columns.index("PEFT export")] == "refused (not in PEFT)"
    assert rows["Phi3"][columns.index("routed")] == "untested"
    with pytest.raises(ValueError, match="no column"):
        support_matrix.render({("llama", "speed"): {"cell": "yes"}})


def test_write_fills_the_readme_block_only_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\nintro\n{support_matrix.START}\nold table\n{support_matrix.END}\nafter\n")
    written = support_matrix.write("| new |\n", tmp_path / "docs" / "support-matrix.md", readme)
    assert written == [tmp_path / "docs" / "support-matrix.md", readme]
    assert readme.read_text() == (f"# Project\nintro\n{support_matrix.START}\n| new |\n\n{support_matrix.README_POINTER}"
                                  f"{support_matrix.END}\nafter\n")
    assert (tmp_path / "docs" / "support-matrix.md").read_text() == "# Support matrix\n\n| new |\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert support_matrix.write("| new |\n", tmp_path / "m.md", plain) == [tmp_path / "m.md"]
    assert plain.read_text() == "no markers\n"
