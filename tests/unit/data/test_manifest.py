"""Reading a user's manifest: formats, column mapping, and how a label column is judged."""
from __future__ import annotations

import pytest

from mmray.config.errors import UserError
from mmray.data.manifest import ColumnMap, LabelMap, load_manifest, resolve_columns


def test_integer_column_with_a_stray_word_stays_integer():
    lm = LabelMap.fit("y", ["0", "2", "1", "cat", "", None, 3.0])
    assert lm.kind == "int" and lm.class_names == ("0", "1", "2", "3")
    assert lm.encode("2") == (2, None, "")
    assert lm.encode("cat")[1] == "label is not an integer"
    assert lm.encode(" ")[1] == "empty label" and lm.encode(-1)[1] == "negative label"
    assert lm.encode(True)[1] == "label is not an integer"


def test_names_are_sorted_into_ids_and_label_type_can_force_it():
    lm = LabelMap.fit("kind", ["owl", "cat", "bee", "cat"])
    assert lm.kind == "str" and lm.class_names == ("bee", "cat", "owl") and lm.encode(" owl ")[0] == 2
    forced = LabelMap.fit("kind", ["1", "2", "10"], label_type="str")
    assert forced.class_names == ("1", "10", "2")
    with pytest.raises(UserError, match="every label is empty"):
        LabelMap.fit("kind", ["", None])


def test_csv_cells_stay_strings_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,label\n007,a.png,1\n\n008,\"b, c.png\",2\n")
    m = load_manifest(str(path))
    assert m.num_rows == 2 and m.columns["id"] == ["007", "008"] and m.columns["image"][1] == "b, c.png"


def test_a_broken_jsonl_line_is_a_row_that_is_rejected_not_a_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "text": "hi", "label": 0}\n{oops\n[1, 2]\n{"id": "b", "text": "yo", "label": 1}\n')
    m = load_manifest(str(path))
    assert m.num_rows == 4 and set(m.broken) == {2, 3}
    assert "not valid JSON" in m.broken[2] and "not a JSON object" in m.broken[3]


def test_column_errors_name_the_flag_and_list_the_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("key,caption,y\na,hello,1\n")
    m = load_manifest(str(path))
    with pytest.raises(UserError) as e:
        resolve_columns(m, ColumnMap(id="key", media={"image": "pic"}))
    text = str(e.value)
    assert "--image-col: column 'pic' is not in the manifest" in text
    assert "--label-col: the manifest has no 'label' column" in text and "(its columns: key, caption, y)" in text
    cols = resolve_columns(m, ColumnMap(id="key", label="y", media={"text": "caption"}, tasks={"mood": "y"}))
    assert cols.media == {"text": "caption"} and cols.tasks == {"label_mood": "y"} and cols.split is None


@pytest.mark.parametrize("name, message", [("m.txt", "unknown format '.txt'"), ("none.csv", "no such file")])
def test_unknown_or_missing_manifest_is_a_user_error(tmp_path, name, message):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(UserError, match=message):
        load_manifest(str(tmp_path / name))
