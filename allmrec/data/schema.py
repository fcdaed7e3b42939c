"""The prepared-data contract: what `prepare` writes and every later stage reads.

Ids: items are contiguous integers 1..n_items (0 is padding, never a real item); users are
contiguous integers 0..n_users-1. Raw ids are kept in the mapping files.

Files under `<run>/data/` (parquet):
- items.parquet      item:int32, raw_id:str, title:str (prompt title), text:str ("Title: t, Description: d"),
                     n_train:int32 (training interactions), group:str ("warm"|"cold"|"mid")
- users.parquet      user:int32, raw_id:str, cold_user:bool
- sequences.parquet  user:int32, seq:list<int32> (full chronological sequence of a *regular* user);
                     train = seq[:-2], valid target = seq[-2], test target = seq[-1]
- candidates_valid.parquet / candidates_test.parquet
                     user:int32, target:int32, negatives:list<int32> (n_negatives distinct items the
                     user never interacted with), history:list<int32> (what precedes target)
- cold_users.parquet user:int32, history:list<int32>, target:int32, negatives:list<int32>
                     (held out of every training file)
- fewshot.parquet    k:int32, user:int32 (seeded subsets of regular users)
Parquet "files" written by Ray are folders of part files; read them with pyarrow.parquet.read_table
(or allmrec.data.load). Rows are not ordered: sort by user/item after reading.
- manifest.json      inputs (path, size, sha256), config, counts, dropped rows by reason, timings
"""
PAD = 0

ITEMS = "items.parquet"
USERS = "users.parquet"
SEQUENCES = "sequences.parquet"
CAND_VALID = "candidates_valid.parquet"
CAND_TEST = "candidates_test.parquet"
COLD_USERS = "cold_users.parquet"
FEWSHOT = "fewshot.parquet"
MANIFEST = "manifest.json"
TEXT_EMB = "text_emb.parquet"  # item:int32, emb:list<float32>  (in <run>/encode/, written by encode)
