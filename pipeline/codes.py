"""The latent-code tables: Parquet schema, writing, validated reading into int16 tensors, and the endless
per-rank batch stream the prior stage trains on."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.storage import Location

METADATA_KEY = b"vq2.codes"
MAX_CODEBOOK = 2**15  # codes are stored as int16


class CodesSchemaError(ValueError):
    """A code table whose columns or metadata do not match what the pipeline writes."""


def level_names(levels: int) -> list[str]:
    """Column names of the levels, top first: top, bottom; top, middle, bottom; top, middle1, middle2, bottom."""
    if levels == 1:
        return ["top"]
    if levels == 3:
        return ["top", "middle", "bottom"]
    return ["top"] + [f"middle{i}" for i in range(1, levels - 1)] + ["bottom"]


@dataclass(frozen=True)
class CodesLayout:
    """What a code table holds: each level's grid and codebook size, and the VQ-VAE that made it."""

    grids: tuple[tuple[int, int], ...]  # top first
    codebook_sizes: tuple[int, ...]
    # No part of equality: a table's identity is its grids, codebooks and VQ-VAE fingerprint. One storage root
    # reached by two paths (a symlink, another mount point, file:// or not) names one model two ways.
    vqvae_model: str = field(compare=False)  # URI of the model file
    vqvae_fingerprint: str

    def __post_init__(self):
        object.__setattr__(self, "grids", tuple(tuple(g) for g in self.grids))
        object.__setattr__(self, "codebook_sizes", tuple(self.codebook_sizes))
        if any(k > MAX_CODEBOOK for k in self.codebook_sizes):
            raise ValueError(f"codebook sizes {self.codebook_sizes} do not fit int16 codes")

    @property
    def levels(self) -> list[str]:
        return level_names(len(self.grids))

    def schema(self, extra: Sequence[pa.Field] = ()) -> pa.Schema:
        """key, label, one column per level; `extra` columns after them (the sample tables' seed, score...)."""
        fields = [pa.field("key", pa.string(), nullable=False), pa.field("label", pa.int32(), nullable=False)]
        fields += [pa.field(name, pa.list_(pa.int16(), h * w), nullable=False) for name, (h, w) in zip(self.levels, self.grids)]
        return pa.schema(fields + list(extra), metadata={METADATA_KEY: json.dumps(asdict(self)).encode()})

    @classmethod
    def from_schema(cls, schema: pa.Schema, origin: str, extra: Sequence[pa.Field] = ()) -> CodesLayout:
        """The layout recorded in a table's metadata, after checking every column against it."""
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise CodesSchemaError(f"{origin}: no {METADATA_KEY.decode()} metadata; not a code table written by vq2")
        try:
            layout = cls(**json.loads(raw))
        except (TypeError, ValueError) as error:
            raise CodesSchemaError(f"{origin}: unreadable {METADATA_KEY.decode()} metadata: {error}") from None
        expected = layout.schema(extra)
        for column in expected:
            if column.name not in schema.names:
                raise CodesSchemaError(f"{origin}: missing column {column.name!r} (expected {column.type})")
            found = schema.field(column.name).type
            if found != column.type:
                raise CodesSchemaError(f"{origin}: column {column.name!r} is {found}, expected {column.type}")
        extra = sorted(set(schema.names) - set(expected.names))
        if extra:
            raise CodesSchemaError(f"{origin}: unexpected column(s) {', '.join(extra)}; expected {expected.names}")
        return layout


def codes_table(keys: list[str], labels, codes: list[torch.Tensor], layout: CodesLayout,
                extra: Sequence[tuple[pa.Field, pa.Array]] = ()) -> pa.Table:
    """One row per image from (B, h, w) code grids, top first, then any `extra` (field, values) columns."""
    columns = [pa.array(keys, pa.string()), pa.array(np.asarray(labels, dtype=np.int32))]
    for (h, w), grid in zip(layout.grids, codes):
        flat = grid.to(torch.int16).reshape(len(keys), h * w).cpu().numpy().reshape(-1)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), h * w))
    columns += [values for _, values in extra]
    return pa.Table.from_arrays(columns, schema=layout.schema([field for field, _ in extra]))


def write_codes(location: Location, table: pa.Table) -> None:
    """One zstd-compressed Parquet file, written atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    location.write_bytes(buffer.getvalue())


def read_codes(location: Location, extra: Sequence[pa.Field] = ()) -> tuple[CodesLayout, pa.Table]:
    """A code table and its layout; a wrong schema is a CodesSchemaError naming the file and column."""
    with location.open_read() as stream:
        table = pq.read_table(stream)
    return CodesLayout.from_schema(table.schema, location.uri, extra), table


def table_tensors(table: pa.Table, layout: CodesLayout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Labels (N,) int64 and each level's codes (N, h, w) int16, without a per-row Python loop."""
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    codes = []
    for name, (h, w) in zip(layout.levels, layout.grids):
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        codes.append(torch.from_numpy(values.reshape(len(table), h, w).copy()))
    return labels, codes


def codes_file_info(location: Location) -> tuple[CodesLayout, int]:
    """Layout and row count of a code table from its Parquet footer alone (no data pages read);
    a wrong schema is a CodesSchemaError naming the file and column."""
    with location.open_read() as stream:
        parquet = pq.ParquetFile(stream)
        schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    return CodesLayout.from_schema(schema, location.uri), rows


@dataclass(frozen=True)
class CodePiece:
    """Rows [start, stop) of one code table: the unit that the ranks of a trainer deal among themselves."""

    file: Location
    start: int
    stop: int


def code_pieces(files: Sequence[Location], rows: Sequence[int], world: int) -> list[CodePiece]:
    """A split's rows as pieces, at least `world` of them when the split has `world` rows: whole files when
    every rank can have one, else each file cut into pieces of at most total // world rows."""
    size = max(1, sum(rows) // world)
    return [CodePiece(file, start, min(count, start + size))
            for file, count in zip(files, rows) for start in range(0, count, size)]


def rank_batches(pieces: Sequence[CodePiece], layout: CodesLayout, batch_size: int, shuffle_rows: int,
                 seed: Sequence[int], rank: int, world: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Endless batches (labels, codes per level) of one rank, read from storage by the rank itself.

    Every pass deals the pieces out in a new seeded order (the same on every rank: rank r takes every
    world-th piece), so each rank reads about 1/world of the split per pass and holds at most
    `shuffle_rows` rows plus one piece; rows are shuffled within that buffer. The stream never ends, so
    every rank takes the same number of steps whatever its share.
    """
    if len(pieces) < world:
        raise ValueError(f"{len(pieces)} pieces of code rows cannot give each of {world} ranks one")
    seed = [part % 2**64 for part in seed]  # numpy takes no negative seed; a configured one may be
    shuffle = np.random.default_rng([*seed, rank])
    held: list[pa.Table] = []
    count, passes = 0, 0
    while True:
        mine = np.random.default_rng([*seed, passes]).permutation(len(pieces))[rank::world]
        # A share smaller than the buffer is shuffled whole, pass by pass, rather than gathered over passes.
        target = max(batch_size, min(shuffle_rows, sum(pieces[i].stop - pieces[i].start for i in mine)))
        for index in mine:
            piece = pieces[index]
            found, table = read_codes(piece.file)
            if found != layout:
                raise CodesSchemaError(f"{piece.file}: layout {asdict(found)} differs from {asdict(layout)}")
            held.append(table.slice(piece.start, piece.stop - piece.start))
            count += piece.stop - piece.start
            if count < target:
                continue
            table = pa.concat_tables(held)
            table = table.take(shuffle.permutation(len(table)))
            whole = len(table) // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield table_tensors(table.slice(start, batch_size), layout)
            held, count = [table.slice(whole)], len(table) - whole
        passes += 1
