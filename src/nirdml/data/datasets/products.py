"""Stanford Online Products (``sop``) and DeepFashion In-Shop (``inshop``).

- ``sop``: ``Ebay_train.txt`` / ``Ebay_test.txt`` under ``root`` (or
  ``root/Stanford_Online_Products``); a header line, then ``image_id class_id super_class_id
  path`` with paths relative to that folder. 11,318 train / 11,316 test classes.
- ``inshop``: ``list_eval_partition.txt`` under ``root`` or ``root/Eval``; a count line and a
  header line, then ``image_name item_id evaluation_status`` (``train``/``query``/``gallery``),
  image paths relative to ``root``. The test split is query + gallery with ``is_query`` /
  ``is_gallery`` masks; its labels cover the items of both.
"""

from __future__ import annotations

from pathlib import Path

from nirdml.data.base import FileDataset, Splits
from nirdml.data.datasets.core import DATASETS, layout_error, read_table, require_root
from nirdml.errors import DatasetError


@DATASETS.register("sop")
def sop(root: Path | None = None, seed: int = 0, on_error: str = "skip") -> Splits:
    """Stanford Online Products (``image_kind="rgb"``)."""
    root = require_root("sop", root)
    for base in (root, root / "Stanford_Online_Products"):
        if (base / "Ebay_train.txt").is_file() and (base / "Ebay_test.txt").is_file():
            break
    else:
        raise layout_error("sop", root, ["Ebay_train.txt and Ebay_test.txt",
                                         "Stanford_Online_Products/Ebay_train.txt"])
    out = {}
    for split in ("train", "test"):
        table = base / f"Ebay_{split}.txt"
        rows = read_table(table, "sop", 4)
        if rows and rows[0][0] == "image_id":
            rows = rows[1:]
        try:
            keys = [int(r[1]) for r in rows]
        except ValueError:
            raise DatasetError(f"sop: {table}: class_id (column 2) must be an integer") from None
        out[split] = FileDataset([str(base / r[3]) for r in rows], keys, on_error=on_error,
                                 name=f"sop/{split}")
    return Splits(train=out["train"], val=None, test=out["test"], image_kind="rgb", name="sop",
                  root=base)


@DATASETS.register("inshop")
def inshop(root: Path | None = None, seed: int = 0, on_error: str = "skip") -> Splits:
    """DeepFashion In-Shop Clothes Retrieval (``image_kind="rgb"``, query/gallery test)."""
    root = require_root("inshop", root)
    for table in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if table.is_file():
            break
    else:
        raise layout_error("inshop", root, ["list_eval_partition.txt",
                                            "Eval/list_eval_partition.txt"])
    rows = read_table(table, "inshop", 3, skip=2)
    statuses = {r[2] for r in rows}
    if not statuses <= {"train", "query", "gallery"}:
        raise DatasetError(f"inshop: {table}: evaluation_status must be train, query or gallery; "
                           f"found {sorted(statuses - {'train', 'query', 'gallery'})}")
    train = [r for r in rows if r[2] == "train"]
    test = [r for r in rows if r[2] != "train"]
    if not test or not any(r[2] == "query" for r in test) or not any(
            r[2] == "gallery" for r in test):
        raise DatasetError(f"inshop: {table} has no query or no gallery images")
    train_ds = FileDataset([str(root / r[0]) for r in train], [r[1] for r in train],
                           on_error=on_error, name="inshop/train")
    test_ds = FileDataset([str(root / r[0]) for r in test], [r[1] for r in test],
                          on_error=on_error, name="inshop/test",
                          is_query=[r[2] == "query" for r in test],
                          is_gallery=[r[2] == "gallery" for r in test])
    return Splits(train=train_ds, val=None, test=test_ds, image_kind="rgb", name="inshop",
                  root=root)
