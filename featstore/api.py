"""A small notebook API: open a store read-only, get metadata and embeddings.

    from featstore import open_store
    with open_store("featstore.duckdb") as fs:
        X, meta = fs.arrays("mobilenetv3-nih-onnx", sources=["nih_cxr14", "covid_cxnet"])
        X, y, groups, meta = fs.arrays("mobilenetv3-nih-onnx", target="binary", positive="covid")
        fs.results(study="cxr-shortcut")      # the study's latest sweep, a Polars frame
        fs.predictions(head="logreg")         # per-image scores of the latest sweeps
        pixels = fs.image(meta["image_id"][0])  # float32 [h, w] in [0, 1], decoded as embed saw it

Unknown backbones, preprocessings, sources, labels and columns raise ValueError with a "did you mean".

SQL someone else wrote (a shared query file, a web form) belongs in a sandboxed store, as
`featstore sql` runs it: open_store(db, sandbox=True) reads no file but the store (and allow_read),
writes none, loads no extension, and Store.sql refuses COPY, EXPORT, ATTACH and the like. DuckDB
applies this to every connection to that file in the process, for the rest of its life.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from featstore.store import connect, embedding_table


class Labelled(NamedTuple):
    """arrays(..., target=...): rows in the same order in all four."""
    X: np.ndarray        # float32 [n, d]
    y: np.ndarray        # int [n]: binary 1 = positive; 3class: index into `classes`
    groups: np.ndarray   # patient (source-namespaced) or image id, as the splits group images (GroupKFold)
    meta: pl.DataFrame   # image_id, source (LeaveOneGroupOut groups for leave-source-out), label, class, ...


class Store:
    def __init__(self, db: str | os.PathLike | None = None, read_only: bool = True, sandbox: bool = False,
                 allow_read=()):
        self.con = connect(db, read_only=read_only)
        self.sandboxed = sandbox
        if sandbox:
            from featstore.query import sandbox as lock_down

            try:
                lock_down(self.con, allow_read)
            except BaseException:
                self.con.close()
                raise

    @classmethod
    def over(cls, con) -> "Store":
        """A Store over a connection someone else opened (and will close)."""
        fs = cls.__new__(cls)
        fs.con, fs.sandboxed = con, False
        return fs

    def close(self):
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        if self.sandboxed:
            from featstore.query import check_statements

            check_statements(query)
        return pl.from_arrow(self.con.sql(query, params=params or None).to_arrow_table())

    def images(self, sources: list[str] | None = None, labels: list[str] | None = None) -> pl.DataFrame:
        self._check_filters(sources, labels)
        where, params = _filters("i", sources, labels)
        return self.sql(f"SELECT i.* FROM images i {where} ORDER BY i.image_id", params)

    def embedding_sets(self) -> pl.DataFrame:
        return self.sql("SELECT * FROM embedding_sets")

    def image_ids_like(self, image: str) -> list[str]:
        """The images `image` may name: an image_id prefix, a path, or a path's trailing part."""
        from pathlib import Path

        return [i for (i,) in self.con.execute(
            "SELECT DISTINCT image_id FROM occurrences WHERE image_id LIKE ? || '%' OR path = ? "
            "OR path LIKE '%/' || ?", [image, str(Path(image).resolve()), image]).fetchall()]

    def embedding_set(self, backbone: str, preprocess: str = "original", weights_id: str | None = None
                      ) -> tuple[str, int]:
        """(weights_id, dim) of the one embedding set of backbone/preprocess (weights_id: pick one of
        several); ValueError naming what the store has when there is none, or several."""
        rows = self.con.execute(
            "SELECT weights_id, dim FROM embedding_sets WHERE backbone = ? AND preprocess = ?",
            [backbone, preprocess]).fetchall()
        if weights_id is not None:
            rows = [r for r in rows if r[0] == weights_id]
        if not rows:
            from featstore.suggest import did_you_mean

            sets = self.con.execute("SELECT DISTINCT backbone, preprocess FROM embedding_sets ORDER BY ALL").fetchall()
            hint = (did_you_mean(backbone, {b for b, _ in sets}) if backbone not in {b for b, _ in sets} else
                    did_you_mean(preprocess, {p for b, p in sets if b == backbone}))
            raise ValueError(f"no embeddings for backbone '{backbone}', preprocessing '{preprocess}'"
                             f"{f', weights {weights_id}' if weights_id else ''}{hint}; the store has: "
                             f"{', '.join(f'{b} / {p}' for b, p in sets) or 'none'}")
        if len(rows) > 1 and weights_id is None:
            # sets made by an older input pipeline of the same backbone: use the current one, say so
            from featstore.backbones import REGISTRY, stale_pipeline

            if backbone in REGISTRY:
                current = [r for r in rows if stale_pipeline(backbone, r[0]) is None]
                if len(current) == 1:
                    import warnings

                    for r in rows:
                        if r is not current[0]:
                            warnings.warn(stale_pipeline(backbone, r[0]) + "; using the current set", stacklevel=3)
                    rows = current
        if len(rows) > 1:  # never mix random-init and trained vectors silently
            raise ValueError(f"{backbone}/{preprocess} has several weight sets ({', '.join(r[0] for r in rows)}); "
                             f"pass weights_id=")
        return rows[0]

    def _check_filters(self, sources, labels):
        """Unknown names are an error, not an empty answer (a typo would look like 'no data')."""
        from featstore.suggest import check

        for kind, col, names in (("source", "source", sources), ("label", "label", labels)):
            if names:
                if isinstance(names, str):
                    raise ValueError(f"{kind}s= takes a list of names, not the string '{names}'")
                have = [v for (v,) in self.con.execute(f"SELECT DISTINCT {col} FROM images ORDER BY 1").fetchall()]
                check(kind, names, have)

    def _relation(self, cols: str, backbone, preprocess, weights_id, sources, labels, found=None):
        """The SELECT of cols over one embedding set joined to its images; found: (weights_id, dim) already
        looked up (embedding_set warns of a stale set once, not once per query)."""
        if found is None:
            self._check_filters(sources, labels)
            found = self.embedding_set(backbone, preprocess, weights_id)
        wid, dim = found
        where, params = _filters("i", sources, labels)
        where = (where + " AND" if where else "WHERE") + " e.backbone = ? AND e.weights_id = ? AND e.preprocess = ?"
        return self.con.sql(f"SELECT {cols} FROM {embedding_table(dim)} e JOIN images i USING (image_id) {where}",
                            params=params + [backbone, wid, preprocess]), found

    def _query(self, cols: str, backbone, preprocess, weights_id, sources, labels, found=None):
        rel, found = self._relation(cols, backbone, preprocess, weights_id, sources, labels, found)
        tbl = rel.to_arrow_table()
        # order by image_id in Arrow: DuckDB's ORDER BY drags every vector through its sort (2.5x slower)
        return tbl.take(pc.sort_indices(tbl, [("image_id", "ascending")])), found

    def embeddings(self, backbone: str, preprocess: str = "original", weights_id: str | None = None,
                   sources: list[str] | None = None, labels: list[str] | None = None,
                   pooling: str | None = None, vectors: bool = True) -> pl.DataFrame:
        """Metadata + `vector` (Array[Float32, d]) for one embedding set, ordered by image_id. pooling (cls,
        mean, pooler) picks a foundation model's set as `featstore embed --pooling` names it. vectors=False:
        the metadata alone (the same rows, none of the vectors' memory)."""
        backbone = _set_name(backbone, pooling)
        tbl, _ = self._query("i.image_id, i.source, i.label, i.class, i.patient_id, i.view, i.sex, i.age, "
                             "e.backbone, e.weights_id, e.preprocess" + (", e.vector" if vectors else ""),
                             backbone, preprocess, weights_id, sources, labels)
        return pl.from_arrow(tbl)

    def arrays(self, backbone: str, preprocess: str = "original", weights_id: str | None = None,
               sources: list[str] | None = None, labels: list[str] | None = None, target: str | None = None,
               positive: str = "covid", classes: list[str] | None = None, pooling: str | None = None):
        """(X float32 [n, d], metadata) with rows in the same order. pooling: as in embeddings().

        With target="binary" (y = label == positive) or "3class" (y = index of the `class` column in
        `classes`, default the store's classes sorted; images of other classes are left out): a
        Labelled (X, y, groups, meta), groups being patients as the splits group them."""
        backbone = _set_name(backbone, pooling)
        query = (backbone, preprocess, weights_id, sources, labels)
        from contextlib import nullcontext

        from featstore.store import in_transaction, transaction

        # both reads below see the same rows (inside the caller's transaction, if one is open)
        with nullcontext() if in_transaction(self.con) else transaction(self.con):
            tbl, found = self._query("i.image_id, i.source, i.label, i.class, i.patient_id", *query)
            X = self._vectors_into(tbl.column("image_id"), found, backbone, preprocess)
        meta = pl.from_arrow(tbl)
        if target is None:
            return X, meta
        from featstore.split import make_meta
        from featstore.suggest import check, unknown

        if target == "binary":
            have = sorted(set(meta["label"].to_list()))
            if positive not in have:
                raise ValueError(unknown("positive label", positive, have))
            y = (meta["label"] == positive).cast(pl.Int64).to_numpy()
        elif target == "3class":
            have = sorted(c for c in set(meta["class"].to_list()) if c is not None)
            classes = list(classes) if classes else have
            check("class", classes, have)
            keep = meta["class"].is_in(classes).fill_null(False).to_numpy()
            X, meta = X[keep], meta.filter(pl.Series(keep))
            y = np.array([classes.index(c) for c in meta["class"]], dtype=np.int64)
        else:
            raise ValueError(unknown("target", target, ["binary", "3class"]))
        groups = make_meta(meta["source"].to_numpy(), y, meta["patient_id"].to_numpy(),
                           meta["image_id"].to_numpy()).groups
        return Labelled(X, y, groups, meta)

    def _vectors_into(self, ids, found, backbone: str, preprocess: str) -> np.ndarray:
        """The set's vectors in the order of `ids` (its image ids, sorted), streamed batch by batch into one
        float32 array: the whole set is held once (at 1M x 1024, 3.8 GiB), beside DuckDB's page cache and one
        64 MiB batch. Reading 1M x 1024 (benchmarks/read_memory.py): peak 8.5 GiB, about 10 s; 6.5 GiB under
        FEATSTORE_DUCKDB_MEMORY=2GB."""
        dim = found[1]
        # fixed-width bytes: a batch's rows are found by binary search, in C (ids are unique in a set)
        keys = _id_bytes(ids)
        X = np.empty((len(keys), dim), np.float32)
        filled = np.zeros(len(keys), bool)
        for batch in self._set_scan(backbone, preprocess, found).to_arrow_reader(batch_size=ARRAY_BATCH):
            if not batch.num_rows or not len(keys):
                continue
            b = _id_bytes(batch.column("image_id"))  # (numpy compares bytes of other widths as they are)
            pos = np.minimum(np.searchsorted(keys, b), len(keys) - 1)
            hit = keys[pos] == b  # the rows asked for; the others are images the filters left out
            if not hit.any():
                continue
            vec = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(len(b), dim)
            if not hit.all():  # (a copy of the batch: only when the filters left some of it out)
                pos, vec = pos[hit], vec[hit]
            X[pos] = vec
            filled[pos] = True
        if not filled.all():
            raise RuntimeError("the embedding set changed while it was read")
        return X

    def _set_scan(self, backbone: str, preprocess: str, found):
        """image_id and vector of every row of one embedding set: a plain scan. Joined to `images`, DuckDB
        builds its hash table on the vectors' side (the smaller estimate), holding the set a second time
        (at 1M x 1024 up to its memory limit, then spilling); the caller keeps the rows it asked for."""
        wid, dim = found
        return self.con.sql(f"SELECT image_id, vector FROM {embedding_table(dim)} WHERE backbone = ? AND "
                            "weights_id = ? AND preprocess = ?", params=[backbone, wid, preprocess])

    def _rows(self, table: str, latest: bool, where: dict) -> pl.DataFrame:
        from featstore.suggest import check

        cols = [c for (c,) in self.con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]).fetchall()]
        check(f"{table} column", where, cols)
        clauses, params = [], []
        for k, v in where.items():
            if v is None:
                continue
            vals = [v] if isinstance(v, (str, int, float, bool)) else list(v)
            clauses.append(f'"{k}" IN ({", ".join("?" * len(vals))})')
            params += vals
        if latest and where.get("sweep_id") is None:  # each study's latest sweep, as latest_results
            clauses.append(f"(study, sweep_id) IN (SELECT study, max(sweep_id) FROM {table} GROUP BY study)")
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        return self.sql(sql, params)

    def results(self, study: str | None = None, sweep_id: str | None = None, latest: bool = True,
                **where) -> pl.DataFrame:
        """`results` rows (the result-row contract, README) of each study's latest sweep (latest=False:
        every sweep), optionally filtered: study=, sweep_id=, and any column=value or =[values]."""
        return self._rows("results", latest, dict(study=study, sweep_id=sweep_id, **where))

    def predictions(self, study: str | None = None, sweep_id: str | None = None, latest: bool = True,
                    **where) -> pl.DataFrame:
        """Per-image test predictions (image_id, source, y, prob, score, ...) of each study's latest
        sweep (latest=False: every sweep), filtered as results()."""
        return self._rows("predictions", latest, dict(study=study, sweep_id=sweep_id, **where))

    def latest_sweep(self, study: str | None = None) -> tuple[str, str] | None:
        """(study, sweep_id) of the named study's latest sweep; without a name, of the latest benchmark
        sweep (never the domain probe's); None when there is none."""
        q = "SELECT study, max(sweep_id) FROM results" + \
            (" WHERE study = ?" if study else " WHERE protocol <> 'domain-probe'") + \
            " GROUP BY study ORDER BY max(sweep_id) DESC LIMIT 1"
        rows = self.con.execute(q, [study] if study else []).fetchall()  # fetchall: no open result left
        return tuple(rows[0]) if rows else None

    def studies(self) -> list[str]:
        """The benchmark studies with rows in `results` (not the domain probe), sorted."""
        return [s for (s,) in self.con.execute("SELECT DISTINCT study FROM results WHERE study <> 'domain-probe' "
                                               "ORDER BY 1").fetchall()]

    def sweep(self, study: str, sweep_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """One sweep's `results` rows (ordered by every column: the same order on any run) and its
        `predictions` rows."""
        return (self.sql("SELECT * FROM results WHERE study = ? AND sweep_id = ? ORDER BY ALL", [study, sweep_id]),
                self.sql("SELECT * FROM predictions WHERE study = ? AND sweep_id = ?", [study, sweep_id]))

    def probe_aucs(self) -> dict:
        """(backbone, preprocess) -> the latest domain probe's macro AUC on all images, where one was run."""
        rows = self.con.execute(
            "SELECT backbone, preprocess, arg_max(auc, sweep_id) FROM results WHERE study = 'domain-probe' "
            "AND head = 'raw' AND test_set = 'all images' AND scope = 'all' GROUP BY ALL").fetchall()
        return {(b, p): a for b, p, a in rows}

    def sources(self) -> list[str]:
        """Every source in the store, sorted."""
        return [s for (s,) in self.con.execute("SELECT DISTINCT source FROM images ORDER BY 1").fetchall()]

    def column_values(self, column: str) -> list:
        """The distinct non-null values of one `images` column."""
        cols = {c for (c,) in self.con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'images'").fetchall()}
        if column not in cols:
            raise ValueError(f"column '{column}' not in the store's images (have {', '.join(sorted(cols))})")
        return [v for (v,) in self.con.execute(f'SELECT DISTINCT "{column}" FROM images').fetchall() if v is not None]

    def occurrences_by_image(self) -> dict[str, list[str]]:
        """image_id -> the sources it occurs in (a file shared by collections occurs in several)."""
        return dict(self.con.execute("SELECT image_id, list(DISTINCT source) FROM occurrences GROUP BY 1").fetchall())

    def near_duplicate_pairs(self) -> list[tuple] | None:
        """`featstore duplicates` pairs (image_a, image_b, phash_max, cosine_min, found_at), ordered; None when
        it never ran on this store."""
        if not self.con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'near_duplicates'"
                                ).fetchall()[0][0]:
            return None
        return self.con.execute("SELECT image_a, image_b, phash_max, cosine_min, found_at FROM near_duplicates "
                                "ORDER BY image_a, image_b").fetchall()

    def near_duplicate_summary(self, pairs: bool = True) -> dict | None:
        """What `featstore duplicates` left, None on a store it never ran on (no table): `pairs` (every
        near_duplicates row; None with pairs=False), `by_source` (near_duplicate_pairs_by_source), and the
        exact copies' `exact_groups` and `exact_across` (groups whose files occur in several sources)."""
        if not self.con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'near_duplicates'"
                                ).fetchall()[0][0]:
            return None
        groups, across = self.con.execute("SELECT count(*), count(*) FILTER (WHERE cross_source) "
                                          "FROM duplicate_groups").fetchall()[0]
        return dict(pairs=self.sql("SELECT * FROM near_duplicates") if pairs else None,
                    by_source=self.sql("SELECT * FROM near_duplicate_pairs_by_source"),
                    exact_groups=groups, exact_across=across)

    def probe_evidence(self, backbone: str, preprocess: str = "original") -> dict:
        """The latest domain probe of an embedding set as `featstore probe` stored it: `probe` (its
        `results` rows, empty if none ran), `points` (probe_map_points: t-SNE coordinates per
        representation, with each image's path) and `neighbors` (probe_neighbors: the k-NN summary),
        both empty for a probe run before schema version 8 or with --no-maps."""
        probe = self.sql("SELECT * FROM results WHERE study = 'domain-probe' AND backbone = ? AND preprocess = ? "
                         "AND sweep_id = (SELECT max(sweep_id) FROM results WHERE study = 'domain-probe' AND "
                         "backbone = ? AND preprocess = ?)", [backbone, preprocess, backbone, preprocess])
        have = {t for (t,) in self.con.execute("SELECT table_name FROM duckdb_tables() WHERE table_name IN "
                                               "('probe_map_points', 'probe_neighbors')").fetchall()}
        sid = probe["sweep_id"][0] if probe.height else None
        points = self.sql("SELECT p.*, i.path FROM probe_map_points p LEFT JOIN images i USING (image_id) "
                          "WHERE p.sweep_id = ? ORDER BY p.representation, p.image_id", [sid]) \
            if sid and "probe_map_points" in have else pl.DataFrame()
        neighbors = self.sql("SELECT source, n, k, same_source, same_source_chance, same_label, same_label_chance "
                             "FROM probe_neighbors WHERE sweep_id = ? ORDER BY source", [sid]) \
            if sid and "probe_neighbors" in have else pl.DataFrame()
        return dict(probe=probe, points=points, neighbors=neighbors)

    def lung_mask_summary(self) -> pl.DataFrame:
        """The `lung_mask_summary` view: lung masks by source, method and outcome."""
        return self.sql("SELECT * FROM lung_mask_summary")

    def lung_mask_methods(self, image_ids) -> list[str]:
        """The methods of the good lung masks stored for these images, sorted."""
        self.con.execute("CREATE OR REPLACE TEMP TABLE _mask_ids AS SELECT unnest(?::VARCHAR[]) AS image_id",
                         [list(map(str, image_ids))])
        return [m for (m,) in self.con.execute("SELECT DISTINCT method FROM lung_masks JOIN _mask_ids "
                                               "USING (image_id) WHERE ok ORDER BY 1").fetchall()]

    def image(self, image_id: str) -> np.ndarray:
        """The image's pixels as featstore decodes them (float32 [height, width], 0 black, 1 white);
        image_id may be a unique prefix."""
        from featstore.decode import decode_file

        hits = self.con.execute("SELECT image_id, path FROM images WHERE starts_with(image_id, ?) LIMIT 2",
                                [str(image_id)]).fetchall()
        if len(hits) != 1:
            raise KeyError(f"image_id '{image_id}' matches {'no' if not hits else 'more than one'} image in the store")
        return decode_file(hits[0][1]).pixels


ARRAY_BATCH = 16_384  # rows per batch arrays() streams: 64 MiB at 1024-d (a module constant: tests make it small)


def _id_bytes(ids) -> np.ndarray:
    """Image ids as a fixed-width bytes array (UTF-8: its byte order is Arrow's sort order)."""
    b = pc.cast(ids, pa.binary()).to_numpy(zero_copy_only=False)
    return np.asarray(b, dtype=f"S{max((len(x) for x in b), default=1)}")


def _set_name(backbone: str, pooling: str | None) -> str:
    """The embedding set's backbone name: `rad-dino` + pooling mean -> `rad-dino@mean`, `rad-dino@cls` ->
    `rad-dino` (its default), as `featstore embed` stores it (backbones.canonical_name)."""
    if not pooling and "@" not in backbone:
        return backbone  # no torch import for the common case
    from featstore.backbones import canonical_name

    return canonical_name(backbone, pooling)


def _filters(alias: str, sources, labels) -> tuple[str, list]:
    clauses, params = [], []
    if sources:
        clauses.append(f"{alias}.source IN ({', '.join('?' * len(sources))})")
        params += list(sources)
    if labels:
        clauses.append(f"{alias}.label IN ({', '.join('?' * len(labels))})")
        params += list(labels)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def open_store(db: str | os.PathLike | None = None, read_only: bool = True, sandbox: bool = False,
               allow_read=()) -> Store:
    return Store(db, read_only=read_only, sandbox=sandbox, allow_read=allow_read)
