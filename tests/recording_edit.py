"""Rewrite a recording's messages with the MCAP writer the Recorder uses: the manipulated copies of the
authentication tests (tampered pixels, rewritten indices, swapped, duplicated and spliced frames).

A recording is read with the stock MCAP reader into its metadata, channels and messages; an edit works
on the frames as (header, image) message pairs; the result is written back with the same schemas,
channels and metadata, so only what the edit changed differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mcap.reader import make_reader
from mcap.writer import CompressionType, Writer

from pipeline.stream.recording import HEADER_TOPIC, TOPIC


@dataclass(frozen=True)
class Item:
    """One MCAP message."""

    topic: str
    sequence: int
    log_time: int
    data: bytes

    @property
    def header(self) -> dict:
        return json.loads(self.data)

    def with_data(self, data: bytes) -> Item:
        return replace(self, data=data)

    def with_header(self, **changes) -> Item:
        return replace(self, data=json.dumps({**self.header, **changes}, separators=(",", ":")).encode())


@dataclass
class Recording:
    metadata: dict[str, dict[str, str]]
    channels: list[tuple[str, str, str, str, bytes]]  # topic, message encoding, schema name, encoding, data
    items: list[Item]

    def pairs(self) -> list[tuple[Item, Item]]:
        """The frames as (header, image) pairs, in file order (the Recorder writes them back to back)."""
        assert [i.topic for i in self.items] == [HEADER_TOPIC, TOPIC] * (len(self.items) // 2)
        return list(zip(self.items[::2], self.items[1::2], strict=True))


def read(path: Path) -> Recording:
    with open(path, "rb") as fh:
        reader = make_reader(fh)
        summary = reader.get_summary()
        channels = [(c.topic, c.message_encoding, summary.schemas[c.schema_id].name,
                     summary.schemas[c.schema_id].encoding, summary.schemas[c.schema_id].data)
                    for c in sorted(summary.channels.values(), key=lambda c: c.id)]
        metadata = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
        items = [Item(ch.topic, m.sequence, m.log_time, m.data)
                 for _, ch, m in reader.iter_messages(log_time_order=False)]
    return Recording(metadata, channels, items)


def write(path: Path, rec: Recording, chunk_size: int = 4000) -> Path:
    with open(path, "wb") as fh:
        writer = Writer(fh, chunk_size=chunk_size, compression=CompressionType.ZSTD)
        writer.start(profile="privcam", library="privcam")
        ids = {}
        for topic, msg_enc, schema_name, schema_enc, data in rec.channels:
            ids[topic] = writer.register_channel(topic, msg_enc, writer.register_schema(schema_name, schema_enc, data))
        for name, values in rec.metadata.items():
            writer.add_metadata(name, values)
        for item in rec.items:
            writer.add_message(ids[item.topic], log_time=item.log_time, publish_time=item.log_time, data=item.data,
                               sequence=item.sequence)
        writer.finish()
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[list[tuple[Item, Item]]], list[tuple[Item, Item]]],
            donor: Path | None = None) -> Path:
    """``src`` with its frames replaced by ``edit(frames)`` (``edit(frames, donor_frames)`` with a donor)."""
    rec = read(src)
    frames = edit(rec.pairs()) if donor is None else edit(rec.pairs(), read(donor).pairs())
    rec.items = [item for pair in frames for item in pair]
    return write(dst, rec)
