"""Every data source on small files made here (or read from ../shared), and its bad inputs."""
import functools
import http.server
import json
import socket
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import SHARED, compose, requires_shared
from gptlab.data import sources as S
from gptlab.data.librus import LibrusSource, clean_librus_html, fetch
from gptlab.data.prepare import SOURCE_KEYS, make_sources

HTML_PAGE = SHARED / "tolstoy" / "html" / "voyna_i_mir_pervyi_variant_text_0073.shtml"


@functools.lru_cache(maxsize=1)
def _defaults():
    data = OmegaConf.to_container(compose().data)
    return {**{k: data[k] for k in SOURCE_KEYS}, "split_seed": data["split_seed"]}  # as make_sources


def settings(**kw):
    """A source's settings: the composed data.* defaults with `kw` on top."""
    return SimpleNamespace(**{**_defaults(), **kw})


def docs(source, part="train"):
    return [text for _, text in source.documents(part)]


# ---------------------------------------------------------------- text

def test_text_units_encodings_and_globs(tmp_path):
    (tmp_path / "a.txt").write_bytes("Первый абзац,\r\nвторая строка.\r\n\r\n\r\n  Второй абзац.\r\n".encode("cp1251"))
    (tmp_path / "b.txt").write_bytes("Третий.\n".encode("cp1251"))
    files = [str(tmp_path / "*.txt")]
    by_file = S.TextSource(settings(files=files, encoding="cp1251", text_unit="file"), tmp_path)
    assert docs(by_file) == ["Первый абзац,\nвторая строка.\n\n\n  Второй абзац.\n", "Третий.\n"]
    by_par = S.TextSource(settings(files=files, encoding="cp1251", text_unit="paragraph"), tmp_path)
    assert docs(by_par) == ["Первый абзац,\nвторая строка.", "  Второй абзац.", "Третий."]
    by_line = S.TextSource(settings(files=files, encoding="cp1251", text_unit="line"), tmp_path)
    assert [d for d in docs(by_line) if d] == ["Первый абзац,", "вторая строка.", "  Второй абзац.", "Третий."]
    keys = [k for k, _ in by_par.documents()]
    assert keys == ["train/0/a.txt#0", "train/0/a.txt#1", "train/1/b.txt#0"]


def test_text_documents_do_not_depend_on_read_blocks(tmp_path, monkeypatch):
    text = "".join(f"Абзац {i}:\r\n{'слово ' * (i % 7)}\r\n \r\n\r\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    src = lambda unit: S.TextSource(settings(files=[str(tmp_path / "t.txt")], text_unit=unit), tmp_path)  # noqa
    whole = {u: docs(src(u)) for u in ("file", "paragraph", "line")}
    monkeypatch.setattr(S, "READ_BLOCK_BYTES", 7)  # cuts CRLFs, 2-byte letters and separators
    for unit, expected in whole.items():
        assert docs(src(unit)) == expected
    assert len(whole["paragraph"]) == 300 and whole["file"][0] == text.replace("\r\n", "\n")


def test_missing_file_and_empty_glob_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.files: file .*nope.txt does not exist"):
        S.TextSource(settings(files=[str(tmp_path / "nope.txt")]), tmp_path)
    with pytest.raises(S.DataError, match=r"data.files: the glob '.*\*.md' matches no file"):
        S.TextSource(settings(files=[str(tmp_path / "*.md")]), tmp_path)
    with pytest.raises(S.DataError, match="is a directory"):
        S.TextSource(settings(files=[str(tmp_path)]), tmp_path)
    with pytest.raises(S.DataError, match="data.files is empty"):
        S.TextSource(settings(files=[]), tmp_path)


def test_undecodable_file_names_file_offset_line_and_encoding(tmp_path):
    path = tmp_path / "ru.txt"
    path.write_bytes("строка\nещё\n".encode("utf-8") + "мир".encode("cp1251"))
    src = S.TextSource(settings(files=[str(path)]), tmp_path)
    offset = len("строка\nещё\n".encode("utf-8"))
    with pytest.raises(S.DataError, match=rf"ru.txt: byte 0xec at offset {offset} \(line 3\) is not valid utf-8; "
                                          r"set data.encoding \(e.g. cp1251\)"):
        docs(src)


# ---------------------------------------------------------------- jsonl

def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return str(path)


def test_jsonl_reads_the_field_and_explicit_valid_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"input": "один", "id": 1}, "", {"input": None}, {"input": "два"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"input": "три"}])
    src = S.JsonlSource(settings(files=[train], valid_files=[test], text_field="input"), tmp_path)
    assert docs(src) == ["один", "", "два"] and docs(src, "valid") == ["три"] and src.has_valid
    assert [k for k, _ in src.documents()] == ["train/0/train.jsonl#0", "train/0/train.jsonl#1",
                                               "train/0/train.jsonl#2"]


@pytest.mark.parametrize("line, message", [
    ('{"input": "ok"', r"bad.jsonl line 2: not valid JSON \("),
    ('{"text": "no input field"}', r"bad.jsonl line 2: no field 'input' \(fields: text\); set data.text_field"),
    ('["a list"]', r"bad.jsonl line 2: expected a JSON object, got list"),
    ('{"input": 5}', r"bad.jsonl line 2: field 'input' is int, not a string"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input": "fine"}, line])
    with pytest.raises(S.DataError, match=message):
        docs(S.JsonlSource(settings(files=[path], text_field="input"), tmp_path))


# ---------------------------------------------------------------- sqlite

@pytest.fixture
def wiki_db(tmp_path):
    path = tmp_path / "wiki.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE ru (id INTEGER, body_text TEXT)")
    con.executemany("INSERT INTO ru VALUES (?, ?)", [(1, "Первая статья."), (2, None), (3, ""), (4, "Вторая.")])
    con.commit()
    con.close()
    return str(path)


def test_sqlite_query_rows(tmp_path, wiki_db):
    src = S.SqliteSource(settings(db=wiki_db, query="SELECT body_text FROM ru LIMIT 3300"), tmp_path)
    assert docs(src) == ["Первая статья.", "", "", "Вторая."]
    assert not src.has_valid


@pytest.mark.parametrize("query, message", [
    ("SELECT body_text FROM en", r"data.query on .*wiki.db: no such table: en \(tables: ru\)"),
    ("SELECT title FROM ru", r"data.query on .*wiki.db: no such column: title \(tables: ru\)"),
])
def test_sqlite_missing_table_or_column(tmp_path, wiki_db, query, message):
    with pytest.raises(S.DataError, match=message):
        docs(S.SqliteSource(settings(db=wiki_db, query=query), tmp_path))


def test_sqlite_missing_db_or_query(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.db: file .*none.db does not exist"):
        S.SqliteSource(settings(db=str(tmp_path / "none.db"), query="SELECT 1"), tmp_path)
    with pytest.raises(S.DataError, match="data.query is not set"):
        S.SqliteSource(settings(db=str(tmp_path / "none.db")), tmp_path)


# ---------------------------------------------------------------- hf

def test_hf_builders_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"content": "import pandas as pd", "repo": "a"}, {"content": "x = 1", "repo": "b"}]
    jsonl = write_jsonl(tmp_path / "code.jsonl", rows)
    for streaming in (False, True):
        src = S.HfSource(settings(builder="json", files=[jsonl], text_field="content", streaming=streaming), tmp_path)
        assert docs(src) == ["import pandas as pd", "x = 1"]
    csv = tmp_path / "code.csv"
    datasets.Dataset.from_list(rows).to_csv(str(csv))
    assert docs(S.HfSource(settings(builder="csv", files=[str(csv)], text_field="content"), tmp_path)) == \
        ["import pandas as pd", "x = 1"]
    parquet = tmp_path / "code.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert docs(S.HfSource(settings(builder="parquet", files=[str(parquet)], text_field="content"), tmp_path)) == \
        ["import pandas as pd", "x = 1"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    src = S.HfSource(settings(builder="disk", files=[str(saved)], text_field="content"), tmp_path)
    assert docs(src) == ["import pandas as pd", "x = 1"]
    assert src.fingerprint()["stats"]["train"][0], "a saved dataset is fingerprinted by the files inside it"


def test_hf_missing_column_and_bad_builder(tmp_path):
    jsonl = write_jsonl(tmp_path / "code.jsonl", [{"content": "x"}])
    with pytest.raises(S.DataError, match=r"data.text_field='text' is not a column of .*code.jsonl "
                                          r"\(columns: content\)"):
        docs(S.HfSource(settings(builder="json", files=[jsonl], text_field="text"), tmp_path))
    with pytest.raises(S.DataError, match=r"data.builder='no/such/dir': choose one of json, csv, .*, a Hub "
                                          r"dataset id \(org/name\) or a local dataset directory"):
        S.HfSource(settings(builder="no/such/dir", files=[jsonl]), tmp_path)


# ---------------------------------------------------------------- source lists

def test_a_list_of_sources_with_per_entry_settings(tmp_path, wiki_db):
    (tmp_path / "a.txt").write_text("текст")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"input": "строка"}])
    dc = compose(["data=text", f"data.files=[{tmp_path / 'a.txt'}]", "data.text_unit=file",
                  f"data.source=[text,{{name: jsonl, files: [{jsonl}], text_field: input}},"
                  f"{{name: sqlite, db: '{wiki_db}', query: 'SELECT body_text FROM ru', min_chars: 7}}]"]).data
    srcs = make_sources(dc, tmp_path)
    assert [s.name for s in srcs] == ["text", "jsonl", "sqlite"]
    assert [docs(s) for s in srcs[:2]] == [["текст"], ["строка"]]
    assert srcs[2].s.min_chars == 7 and srcs[0].s.min_chars == 1


def test_bad_source_names_and_keys(tmp_path):
    with pytest.raises(S.DataError, match="'csv' is not a source; choose from python_source, text, jsonl"):
        make_sources(compose(["data.source=csv"]).data, tmp_path)
    with pytest.raises(S.DataError, match=r"data.source\[0\]: unknown key\(s\) \['file'\]"):
        make_sources(compose(["data.source=[{name: text, file: a.txt}]"]).data, tmp_path)
    with pytest.raises(S.DataError, match="data.text_unit='page'"):
        make_sources(compose(["data=text", "data.files=[x]", "data.text_unit=page"]).data, tmp_path)


# ---------------------------------------------------------------- librus_html

@requires_shared
def test_librus_cleaning_of_a_real_lib_ru_page():
    page = HTML_PAGE.read_bytes().decode("cp1251")
    text = clean_librus_html(page)
    assert text.startswith("Лев Николаевич Толстой\nВойна и мир\nПервый вариант романа\n")
    assert "Я пишу до сих пор только о князьях, графах, министрах" in text[:3000]
    assert text.rstrip().endswith("К О Н Е Ц")
    # (one ">" is in the novel itself: "Un b>tard", an old encoding artefact for "bâtard")
    assert "<" not in text and "&nbsp;" not in text and "&" not in text and "\xa0" not in text
    assert "Оценка" not in text and "Связаться с программистом" not in text  # page furniture
    assert "\n\n" not in text and all(line == line.strip() for line in text.splitlines())
    assert "\ufffd" not in text and text.encode("utf-8").decode("utf-8") == text
    assert len(text) > 1_500_000


def test_librus_without_section_markers_drops_the_header_comment():
    page = ("<html><head><title>t</title></head><body><!-- header --><a href=x>menu</a>\n<!-- end -->\n"
            "<dd>&nbsp;&nbsp; Первый &laquo;абзац&raquo;.<br>\n\n<dd>Второй&#33;<script>var x=1;</script>\n</body>")
    assert clean_librus_html(page) == "Первый «абзац».\nВторой!"


class _Page(http.server.BaseHTTPRequestHandler):
    body = "<!--Section Begins--><dd>Страница &mdash; текст.<!--Section Ends-->".encode("cp1251")
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def page_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Page.hits = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_librus_downloads_once_then_works_offline(tmp_path, page_server):
    url = f"{page_server}/t/tolstoj/text_0010.shtml"
    s = settings(urls=[url], encoding="cp1251", download_dir=str(tmp_path / "dl"), download_retries=0)
    assert docs(LibrusSource(s, tmp_path)) == ["Страница — текст."]
    assert _Page.hits == 1 and len(list((tmp_path / "dl").iterdir())) == 1
    assert docs(LibrusSource(s, tmp_path)) == ["Страница — текст."]
    assert _Page.hits == 1  # the cached copy, no second request


def test_librus_refuses_non_http_too_big_and_unreachable(tmp_path, page_server):
    with pytest.raises(S.DataError, match=r"data.urls: 'file:///etc/passwd' is not an http\(s\) URL"):
        LibrusSource(settings(urls=["file:///etc/passwd"]), tmp_path)
    with pytest.raises(S.DataError, match="over data.download_max_bytes=10"):
        fetch(f"{page_server}/big", tmp_path / "dl", timeout_s=5, retries=0, max_bytes=10)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/gone.shtml"
    with pytest.raises(S.DataError, match=r"data.urls: http://127.0.0.1:\d+/gone.shtml is not in the download "
                                          r"cache .* and could not be downloaded after 2 tries"):
        fetch(dead, tmp_path / "dl", timeout_s=2, retries=1, max_bytes=1000, backoff_s=0.01)


@requires_shared
def test_librus_local_pages_are_a_source():
    src = LibrusSource(settings(files=[str(HTML_PAGE.parent / "*.shtml")], encoding="cp1251"), Path("/nonexistent"))
    (text,) = docs(src)
    assert text.startswith("Лев Николаевич Толстой")
